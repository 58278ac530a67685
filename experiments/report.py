"""Writes DIR/results.md, results.csv and plots of a sweep directory (also run at the
end of every sweep), and prints the table.

  python -m experiments.report runs/isoflop
"""

from absl import app

from experiments.cli import one_line_errors


@one_line_errors
def main(argv):
  if len(argv) != 2:
    raise ValueError("usage: python -m experiments.report SWEEP_DIR")
  from llm.sweep import report
  written = report.write(argv[1])
  print(written["markdown"])
  print("wrote " + ", ".join(written["files"]))


if __name__ == "__main__":
  app.run(main)

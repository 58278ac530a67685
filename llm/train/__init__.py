"""Training: state, optimizer, the train/eval steps, the loop, checkpoints, metrics."""

from llm.train.loop import create_state, load, run, sample_prompts, sample_texts
from llm.train.state import TrainState
from llm.train.step import eval_step, train_step

"""Decoding: one decode state (`decode`) and the strategies over it."""

from llm.inference.beam import beam_search
from llm.inference.decode import (DecodeState, decode_layout, decode_step, for_decoding,
                                  fuse_projections, gather_rows, init_cache, one_row_layout,
                                  prefill, truncate_rows, with_cache_len)
from llm.inference.generate import (Generation, generate, generate_sequences, generate_seq2seq,
                                    right_pad)
from llm.inference.prefix_cache import PrefixCache, build_prefix_cache, generate_with_prefix
from llm.inference.sampling import (SamplingConfig, sample, sampling_logits, token_logprobs,
                                    top_k_filter, top_p_filter, untrained_ids)
from llm.inference.speculative import speculative_generate

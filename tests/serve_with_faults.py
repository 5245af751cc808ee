"""Test-only launcher: `python -m mst5_jax.serve` with two faults injected by monkeypatching.

    python tests/serve_with_faults.py --model DIR [serve flags...]

The server itself has no test hook; this script patches `SentenceEncoder` before calling
`mst5_jax.serve.main`, so the real CLI, app and batcher run unchanged:

* a device batch holding a sentence that tokenises exactly like `POISON` raises inside
  `SentenceEncoder.dispatch`, as an internal error (a device fault, an XLA error) would;
* each bucket shape waits `COMPILE_DELAY_S` before compiling, so warm-up lasts long enough
  for a client to see `/health` answer 503 before it answers 200.
"""
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mst5_jax import serve  # noqa: E402
from mst5_jax.inference.encoder import SentenceEncoder  # noqa: E402

POISON = "poison pill"
COMPILE_DELAY_S = 1.0

_dispatch, _fn = SentenceEncoder.dispatch, SentenceEncoder._fn


def _failing_dispatch(self, rows_ids, rows, length):
    marker = list(self.tokenizer.encode_batch([POISON])[0])
    if any(list(r) == marker for r in rows_ids):
        raise RuntimeError(f"injected failure: a batch of {len(rows_ids)} sentences held {POISON!r}")
    return _dispatch(self, rows_ids, rows, length)


def _slow_fn(self, batch, length):
    if (batch, length) not in self._compiled:
        time.sleep(COMPILE_DELAY_S)
    return _fn(self, batch, length)


SentenceEncoder.dispatch = _failing_dispatch
SentenceEncoder._fn = _slow_fn

if __name__ == "__main__":
    sys.exit(serve.main())

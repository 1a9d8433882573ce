"""`python -m dpo_jax.main` with the synthetic task's completion lengths changed for this run only, so the study
can try a task change without editing dpo_jax/data/synthetic.py:

    python experiments/demo_seeds/launch.py --words=4,6 --config=configs/demo.py --workdir=/tmp/x

`--words=MIN,MAX` sets synthetic.MIN_COMPLETION_WORDS, MAX_COMPLETION_WORDS (each completion's word count is drawn
uniformly from MIN..MAX); every other flag goes to dpo_jax.main unchanged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app  # noqa: E402

from dpo_jax import main  # noqa: E402
from dpo_jax.data import synthetic  # noqa: E402

if __name__ == "__main__":
    argv = [a for a in sys.argv if not a.startswith("--words=")]
    for a in sys.argv:
        if a.startswith("--words="):
            synthetic.MIN_COMPLETION_WORDS, synthetic.MAX_COMPLETION_WORDS = map(int, a[len("--words="):].split(","))
    print(f"completion words: {synthetic.MIN_COMPLETION_WORDS}..{synthetic.MAX_COMPLETION_WORDS}", flush=True)
    sys.argv = argv
    app.run(main.main, flags_parser=main.parse_flags)

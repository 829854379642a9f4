"""The data layer: readers of every dataset kind in its official format (sources.py: C4, C-Eval, alpaca-cleaned,
ShareGPT; cmmlu.py: CMMLU), the prompt templates of the upstream methods (templates.py), C-Eval's subject table
(ceval_subjects.py) and the seeded, tokenized calibration mixture the quantizers calibrate on (mixture.py).

Nothing is imported here, so `llmship.data.sources` can be read without the mixture and the mixture imports its
readers without a cycle through this package."""

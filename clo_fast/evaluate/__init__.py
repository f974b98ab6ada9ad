"""Evaluation: language fidelity and English retention, for several models side by side.

    python -m clo_fast.evaluate --config configs/<run>.yaml --model base=<path|hub name> --model clo=<path> ...

For each model and each prompt language (English and the config's target language) on held-out prompts:

- fidelity: share of greedy responses that the language-ID package (`clo_fast.language_id`) identifies
  as the prompt's language (an empty or letter-less response counts as a miss);
- chrF of each language's responses against the held-out reference answers in that language (sacrebleu's
  chrF, 0-100, corpus level): a content metric beside fidelity;
- mean response length in tokens (generated tokens before the first EOS);
- reference NLL per token: teacher-forced negative log-likelihood of the held-out reference responses
  (response tokens and the closing EOS only, token-mean over the whole language) - cheap, deterministic
  and comparable across models that share a tokenizer (base vs fine-tuned);
- optionally, the paper's pairwise win rate against a baseline model (`--versus sft=PATH`) through an LLM
  judge at an OpenAI-compatible endpoint (`eval.judge_endpoint`): both orders, ties half, per language, a
  bootstrap interval and a length-controlled figure, judgments cached on disk (`judge`); without an
  endpoint the judge is skipped with a message;
- optionally, benchmark accuracy ± stderr through lm-evaluation-harness (`eval.benchmarks` / `--benchmarks`,
  e.g. mmlu and the paper's MMMLU tasks mmmlu_<lang>_<region>; `benchmarks`).

Prompts come from the "eval" split of the text-level dataset (`clo_fast.data.build_text_dataset`) or from
an explicit list. Prompts are formatted as in training: `data.prompt_template` for `data.template: plain`,
the tokenizer's chat template for `data.template: chat`.

Outputs in `eval.output_dir` (or `--out-dir`): report.json, report.md (models as columns), report.png
(fidelity and NLL per model) and generations.jsonl (every prompt, response and detected language).

Python API (the training run calls it at the end, on rank 0 only):

Modules: prompts (held-out prompts, encoded as in training), models (loading), generation (greedy
responses, reference NLL), judge (optional LLM judge), benchmarks (lm-evaluation-harness tasks), report
(metrics, table, plot, files), run (the driver, `evaluate_models`), cli (`python -m clo_fast.evaluate`),
comparison (several seeds per method: mean, standard deviation, table and plot, for `python -m clo_fast.compare`).
"""

from clo_fast.evaluate.benchmarks import run_benchmarks, task_language
from clo_fast.evaluate.errors import EvalError
from clo_fast.evaluate.generation import (
    build_reference_batch,
    generate_responses,
    reference_examples,
    reference_nll,
    sequence_logprob_sums,
)
from clo_fast.evaluate.judge import (
    build_judge_request,
    http_judge,
    judge_pairwise,
    judge_url,
    length_controlled_win_rate,
    parse_verdict,
)
from clo_fast.evaluate.models import load_model
from clo_fast.evaluate.prompts import encode_item, encode_prompt, load_eval_prompts, normalize_prompts
from clo_fast.evaluate.report import render_markdown, write_report
from clo_fast.evaluate.run import evaluate_models, parse_model_specs

__all__ = [
    "EvalError",
    "build_judge_request",
    "build_reference_batch",
    "encode_item",
    "encode_prompt",
    "evaluate_models",
    "generate_responses",
    "http_judge",
    "judge_pairwise",
    "judge_url",
    "length_controlled_win_rate",
    "load_eval_prompts",
    "load_model",
    "normalize_prompts",
    "parse_model_specs",
    "parse_verdict",
    "reference_examples",
    "reference_nll",
    "run_benchmarks",
    "render_markdown",
    "sequence_logprob_sums",
    "task_language",
    "write_report",
]

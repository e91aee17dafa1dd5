"""Benchmark evaluation: load VideoMME / MLVU / LongVideoBench / LVBench, answer each question, score the methods.

    from flexselect.eval import load_benchmark, run_eval, summarize, format_comparison
    items = load_benchmark("videomme", Path("/data/Video-MME"))
    run_eval(items, lambda video, prompt: pipe.answer(video, prompt).text, Path("videomme.jsonl"), method="flexselect")
    print(format_comparison(summarize(Path("videomme.jsonl"))))

The harness knows nothing about models: any `AnswerFn` (video path, prompt) -> reply text can be evaluated.
"""

from .datasets import BENCHMARKS, Item, load_benchmark
from .harness import AnswerFn, format_comparison, run_eval, summarize
from .prompt import build_prompt, extract_letter, item_prompt
from .synthetic import make_mini_dataset

__all__ = [
    "AnswerFn",
    "BENCHMARKS",
    "Item",
    "build_prompt",
    "extract_letter",
    "format_comparison",
    "item_prompt",
    "load_benchmark",
    "make_mini_dataset",
    "run_eval",
    "summarize",
]

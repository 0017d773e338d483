"""Reasoning evaluation: generate with the inference engine, then score every question.

For each question the engine runs one greedy completion (the ``accuracy``) and one request of
``n = max(samples)`` completions at ``temperature`` (seeded: the same numbers on every run);
all requests go to the engine at once, so continuous batching keeps its batch full. From the
samples: maj@k (majority vote of the first k extracted answers), pass@k (the unbiased
estimator over all n), best-of-k (the verifier's pick among the first k), and the tokens each
costs. Results are per task family and overall.

Prompt format follows the checkpoint: a model finetuned on chats (its meta.json says
``data.format = "chat"``) gets the chat template with an assistant turn to fill; a pretrained
model gets the corpus's own text, ``Q: <question> A:``, after an end-of-document token (how it
saw every document during pretraining).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from gonogo.data import synthetic
from gonogo.errors import UserError
from gonogo.eval import verifier
from gonogo.eval.scoring import best_of, bootstrap_intervals, majority_answer, pass_at_k

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = (1, 2, 4, 8, 16)
REPORTED_LINES = 20


@dataclass
class Question:
    prompt: str | list[dict]          # the question text, or chat messages (user data)
    answer: str                       # the reference answer
    family: str
    question: Optional[str] = None    # the synthetic question text (what the verifier reads besides the completion)


@dataclass
class Options:
    samples: Sequence[int] = DEFAULT_SAMPLES
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_tokens: int = 96
    max_batch: int = 64
    sample_seeds: int = 1             # sampling rounds of n samples per question, each its own seed
    bootstrap: int = 1000             # bootstrap draws over questions for the confidence intervals
    timeout_s: float = 1200.0         # bound on the whole generation
    device: str = "auto"              # where the engine decodes (gonogo/infer/device.py)


# -- questions --------------------------------------------------------------------------------------

def builtin_questions(num: int, seed: int, families: Optional[Sequence[str]] = None) -> list[Question]:
    """``num`` questions of the held-out split (never seen in training)."""
    try:
        problems = synthetic.generate("heldout", seed, num, families)
    except ValueError as error:
        raise UserError(str(error)) from None
    return [Question(prompt=p.question, answer=p.answer, family=p.family, question=p.question) for p in problems]


def _user_question(line: str) -> tuple[Optional[Question], Optional[str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        return None, "needs a non-empty 'answer' (string or number)"
    family = record.get("family", "user")
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages)):
            return None, "'messages' must be a non-empty list of {role: system|user|assistant, content: string}"
        return Question(prompt=messages, answer=answer.strip(), family=str(family)), None
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return Question(prompt=record["prompt"], answer=answer.strip(), family=str(family)), None
    return None, "needs a 'prompt' string or a 'messages' list"


def user_questions(path: str | Path, min_good_fraction: float = 0.9,
                   num: Optional[int] = None) -> tuple[list[Question], list[tuple[int, str]]]:
    """Questions of a JSONL file ({"prompt"|"messages", "answer"}) and its bad lines."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file (give a JSONL file of {{\"prompt\", \"answer\"}} lines)")
    questions: list[Question] = []
    bad: list[tuple[int, str]] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            question, problem = _user_question(line)
            if problem:
                bad.append((number, problem))
                if len(bad) <= REPORTED_LINES:
                    log.warning("%s:%d: skipped: %s", path, number, problem)
            else:
                assert question is not None  # no problem: the line parsed
                questions.append(question)
    total = len(questions) + len(bad)
    if not total:
        raise UserError(f"{path}: the file has no questions")
    if len(questions) / total < min_good_fraction:
        raise UserError(f"{path}: only {len(questions)} of {total} lines are usable (< the minimum "
                        f"{100 * min_good_fraction:.0f}%); first bad line {bad[0][0]}: {bad[0][1]}")
    return questions[:num] if num else questions, bad


def is_correct(completion: str, reference: str) -> bool:
    return synthetic.verify(synthetic.Problem("", "", reference, ""), completion)


def normal_answer(answer: Optional[str]) -> Optional[str]:
    """One spelling per answer for the vote: "0432", "+432" and "432.0" are all 432."""
    return synthetic.canonical_answer(answer)


def prompt_ids(question: Question, tokenizer, chat: bool) -> list[int]:
    if isinstance(question.prompt, list):
        messages = [m for m in question.prompt]
        if messages[-1]["role"] == "assistant":   # a reference answer turn is not part of the prompt
            messages = messages[:-1]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)[0]
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": question.prompt}],
                                             add_generation_prompt=True)[0]
    text = synthetic.Problem(question.prompt, "", "", "").prompt if question.question else question.prompt
    return [tokenizer.eos_id] + tokenizer.encode(text)


def checkpoint_is_chat(meta: Any) -> bool:
    return isinstance(meta, dict) and (meta.get("data") or {}).get("format") == "chat"


# -- generation -------------------------------------------------------------------------------------

@dataclass
class _Pending:
    texts: list[str]
    tokens: list[int] = field(default_factory=list)
    left: int = 0


def generate_all(engine, prompts: list[list[int]], params_of: Callable[[int], Any], timeout_s: float
                 ) -> list[tuple[list[str], list[int]]]:
    """Every request's completions (texts, token counts), all submitted to the running engine."""
    from gonogo.infer.engine import Request

    results = [_Pending(texts=[""] * params_of(i).n, tokens=[0] * params_of(i).n, left=params_of(i).n)
               for i in range(len(prompts))]
    lock = threading.Lock()
    finished = threading.Event()
    remaining = [len(prompts)]

    def emitter(number: int):
        def emit(event) -> None:
            with lock:
                pending = results[number]
                pending.texts[event.index] += event.text
                pending.tokens[event.index] += len(event.token_ids) + (event.finish_reason == "stop")
                if event.finish_reason == "abort":
                    log.error("request %d was aborted by the engine", number)
                if event.done:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        finished.set()
        return emit

    for number, ids in enumerate(prompts):
        engine.submit(Request(list(ids), params_of(number), emitter(number)))
    if not finished.wait(timeout_s):
        raise TimeoutError(f"generation did not finish within {timeout_s:.0f} s")
    if engine.failure is not None:
        raise RuntimeError(f"the inference engine failed: {engine.failure!r}")
    return [(pending.texts, pending.tokens) for pending in results]


def run_model(checkpoint: str | Path, questions: list[Question], options: Options, *,
              greedy_only: bool = False, prompt_format: str = "auto") -> dict[str, Any]:
    """Generate for every question with one checkpoint; the raw completions and timing."""
    from gonogo.data.hf_tokenizer import load_tokenizer
    from gonogo.infer.engine import Engine, EngineSettings
    from gonogo.infer.sampling import SamplingParams
    from gonogo.checkpoints import resolve
    from gonogo.infer.device import load_for_inference

    resolved = resolve(checkpoint)  # a path resolved earlier in this process is a cache hit
    model, _config, meta = load_for_inference(resolved)
    chat = checkpoint_is_chat(meta) if prompt_format == "auto" else prompt_format == "chat"
    tokenizer = load_tokenizer(meta)  # the byte tokenizer, or a model's own
    n = max(options.samples)
    rounds = 0 if greedy_only else options.sample_seeds
    requests = (1 + rounds) * len(questions)
    engine = Engine(model, tokenizer, EngineSettings(max_batch=max(options.max_batch, n), max_waiting=requests + 1,
                                                     device=options.device))
    prompts = [prompt_ids(question, tokenizer, chat) for question in questions]
    greedy = SamplingParams(max_tokens=options.max_tokens, temperature=0.0)

    def params_of(number: int):
        if number < len(questions):
            return greedy
        round_, index = divmod(number - len(questions), len(questions))
        # each question and round its own seeds (seed + choice index inside the engine): reproducible
        # runs, and round 0 samples what a one-seed eval of the same seed samples
        return SamplingParams(max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
                              top_k=options.top_k, seed=(options.seed + 1000 * round_) * 1_000_003 + index * n, n=n)

    started = time.perf_counter()
    engine.start()
    try:
        outputs = generate_all(engine, prompts * (1 + rounds), params_of, options.timeout_s)
    finally:
        engine.stop()
    seconds = time.perf_counter() - started
    return {"checkpoint": str(resolved.path), "prompt_format": "chat" if chat else "text",
            "greedy": outputs[:len(questions)],
            # per question, its rounds: [(texts, tokens) of round 0, of round 1, ...]
            "sampled": [[outputs[len(questions) * (1 + r) + i] for r in range(rounds)] for i in range(len(questions))],
            "seconds": seconds,
            "tokens": sum(sum(tokens) for _texts, tokens in outputs)}


# -- scoring ----------------------------------------------------------------------------------------

def prompt_text(question: Question) -> str:
    """The text the verifier may read: the question, or the last user turn of a chat."""
    if question.question:
        return question.question
    if isinstance(question.prompt, str):
        return question.prompt
    users = [message["content"] for message in question.prompt if message["role"] == "user"]
    return users[-1] if users else ""


def _round_scores(question: Question, texts: list[str], tokens: list[int], samples: Sequence[int],
                  judge: Optional[Callable[[str], float]]) -> tuple[dict[str, Any], list[Optional[float]]]:
    """maj@k, pass@k, best-of-k and tokens@k of one round of n samples. The verifier scores every
    sample first; the reference answer is looked at only afterwards, to label the picks."""
    answers = [normal_answer(synthetic.extract_answer(text)) for text in texts]
    scores: list[Optional[float]] = [judge(text) for text in texts] if judge else [None] * len(texts)
    # with no verifier every sample ties and best_of falls back to the vote (never to the reference)
    score_of = dict(zip(texts, scores))
    picks = {k: best_of(texts[:k], answers[:k], lambda text: score_of[text] or 0.0) for k in samples}
    correct = [is_correct(text, question.answer) for text in texts]
    values: dict[str, Any] = {}
    for k in samples:
        vote = majority_answer(answers[:k])
        values[f"maj@{k}"] = float(vote is not None and is_correct(f"{synthetic.ANSWER_MARK} {vote}", question.answer))
        values[f"pass@{k}"] = pass_at_k(len(texts), sum(correct), k)
        values[f"best_of_{k}"] = float(correct[picks[k]])
        values[f"tokens@{k}"] = sum(tokens[:k])
    values["answers"], values["correct"] = answers, correct
    return values, scores


def score_question(question: Question, greedy: tuple[list[str], list[int]],
                   sampled: Optional[Sequence[tuple[list[str], list[int]]]], samples: Sequence[int]) -> dict[str, Any]:
    """One question's scores: greedy correctness and, per k, maj / pass / best-of and tokens, each
    the mean over the sampling rounds (one round per sampling seed)."""
    greedy_text = greedy[0][0]
    row: dict[str, Any] = {"question": prompt_text(question), "family": question.family, "answer": question.answer,
                           "greedy": greedy_text,
                           "correct": is_correct(greedy_text, question.answer),
                           "answered": synthetic.extract_answer(greedy_text) is not None,
                           "greedy_tokens": greedy[1][0]}
    if not sampled:
        return row
    judge = verifier.scorer_for(prompt_text(question))
    row["verifier"] = verifier.PROCESS_VERIFIER if judge else verifier.NO_VERIFIER
    rounds = [_round_scores(question, texts, tokens, samples, judge) for texts, tokens in sampled]
    for k in samples:
        for name in (f"maj@{k}", f"pass@{k}", f"best_of_{k}", f"tokens@{k}"):
            row[name] = sum(values[name] for values, _ in rounds) / len(rounds)
    row["per_round"] = [{name: value for name, value in values.items() if name not in ("answers", "correct")}
                        for values, _ in rounds]
    row["samples"] = [text for texts, _tokens in sampled for text in texts]
    row["sample_answers"] = [answer for values, _ in rounds for answer in values["answers"]]
    row["sample_correct"] = [flag for values, _ in rounds for flag in values["correct"]]
    row["verifier_scores"] = [value for _, scores in rounds for value in scores]
    return row


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def verifier_quality(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Precision and recall of the verifier's acceptance (every check passed) against the labels
    (right or wrong against the reference, computed after scoring), over every scored sample."""
    pairs = [(score >= verifier.ACCEPT, correct) for row in rows
             for score, correct in zip(row.get("verifier_scores", []), row.get("sample_correct", []))
             if score is not None]
    accepted = sum(1 for accept, _ in pairs if accept)
    right = sum(1 for _, correct in pairs if correct)
    both = sum(1 for accept, correct in pairs if accept and correct)
    return {"verifier_samples": len(pairs), "verifier_accepted": accepted, "verifier_right_samples": right,
            "verifier_precision": both / accepted if accepted else None,
            "verifier_recall": both / right if right else None,
            # how much richer in right answers the accepted samples are than all samples (1: no better
            # than accepting at random)
            "verifier_lift": both * len(pairs) / (accepted * right) if accepted and right else None}


def summarise(rows: list[dict[str, Any]], samples: Sequence[int]) -> dict[str, Any]:
    """Mean scores over rows: overall and per family (a mean over no rows is absent, not 0)."""
    def block(subset: list[dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {"questions": len(subset), "accuracy": _mean([float(r["correct"]) for r in subset]),
                                  "answered": _mean([float(r["answered"]) for r in subset])}
        if subset and "samples" in subset[0]:
            for k in samples:
                for name in (f"maj@{k}", f"pass@{k}", f"best_of_{k}"):
                    result[name] = _mean([float(r[name]) for r in subset])
            result["tokens_per_question"] = _mean([r["greedy_tokens"] + r[f"tokens@{max(samples)}"] for r in subset])
        else:
            result["tokens_per_question"] = _mean([r["greedy_tokens"] for r in subset])
        return result

    families: dict[str, list] = defaultdict(list)
    for row in rows:
        families[row["family"]].append(row)
    summary = block(rows)
    summary["per_family"] = {name: block(subset) for name, subset in sorted(families.items())}
    if rows and "samples" in rows[0]:
        summary["curve"] = [{"k": k, "maj": summary[f"maj@{k}"], "pass": summary[f"pass@{k}"],
                             "best_of": summary[f"best_of_{k}"],
                             "tokens_per_question": _mean([r["greedy_tokens"] + r[f"tokens@{k}"] for r in rows])}
                            for k in samples]
        summary["verifier"] = sorted({row["verifier"] for row in rows})
        summary.update(verifier_quality(rows))
        for name, block_of in summary["per_family"].items():
            block_of.update(verifier_quality(families[name]))
    return summary


def scaling_intervals(rows: list[dict[str, Any]], samples: Sequence[int], compare_rows: Optional[list[dict[str, Any]]],
                      draws: int, seed: int, level: float = 0.95) -> dict[str, Any]:
    """Bootstrap confidence intervals over questions for greedy, maj@k, best-of-k, pass@k and the
    paired gains over greedy (``maj_gain@k``, ``best_gain@k``; ``accuracy_gain`` against the
    compared model). Each question's sampled scores are already the mean over the seeds."""
    columns: dict[str, list[float]] = {"accuracy": [float(r["correct"]) for r in rows]}
    if "samples" in rows[0]:
        for k in samples:
            for name in (f"maj@{k}", f"pass@{k}", f"best_of_{k}"):
                columns[name] = [float(r[name]) for r in rows]
            columns[f"maj_gain@{k}"] = [r[f"maj@{k}"] - r["correct"] for r in rows]
            columns[f"best_gain@{k}"] = [r[f"best_of_{k}"] - r["correct"] for r in rows]
    if compare_rows is not None:
        columns["accuracy_gain"] = [float(r["correct"]) - float(o["correct"]) for r, o in zip(rows, compare_rows)]
    names = list(columns)
    intervals = bootstrap_intervals([[columns[name][i] for name in names] for i in range(len(rows))],
                                    draws=draws, seed=seed, level=level)
    result: dict[str, Any] = {}
    for name, (low, high) in zip(names, intervals):
        result[f"{name}_ci_low"], result[f"{name}_ci_high"] = low, high
    return result


def per_seed(rows: list[dict[str, Any]], options: Options) -> list[dict[str, Any]]:
    """The mean scores of each sampling round alone: does a gain hold seed by seed?"""
    result = []
    for round_ in range(options.sample_seeds):
        entry: dict[str, Any] = {"sampling_seed": options.seed + 1000 * round_}
        for k in options.samples:
            for name in (f"maj@{k}", f"best_of_{k}", f"pass@{k}"):
                entry[name] = _mean([row["per_round"][round_][name] for row in rows])
            entry[f"maj_gain@{k}"] = _mean([row["per_round"][round_][f"maj@{k}"] - row["correct"] for row in rows])
            entry[f"best_gain@{k}"] = _mean([row["per_round"][round_][f"best_of_{k}"] - row["correct"] for row in rows])
        result.append(entry)
    return result


def evaluate(checkpoint: str | Path, questions: list[Question], options: Options, *,
             compare_to: Optional[str | Path] = None, prompt_format: str = "auto",
             samples_path: Optional[Path] = None) -> dict[str, Any]:
    """The whole evaluation of one checkpoint (and the greedy accuracy of ``compare_to``)."""
    if not questions:
        raise UserError("no questions to evaluate")
    if any(k < 1 for k in options.samples):
        raise UserError(f"samples {list(options.samples)}: every k must be at least 1")
    if options.temperature <= 0:
        raise UserError(f"temperature {options.temperature}: sampling for maj@k / pass@k needs a temperature > 0")
    if options.sample_seeds < 1:
        raise UserError(f"sample_seeds {options.sample_seeds}: give at least one sampling seed")
    output = run_model(checkpoint, questions, options, prompt_format=prompt_format)
    rows = [score_question(question, greedy, sampled, options.samples)
            for question, greedy, sampled in zip(questions, output["greedy"], output["sampled"])]
    summary = summarise(rows, options.samples)
    for k in options.samples:
        summary[f"maj_gain@{k}"] = summary[f"maj@{k}"] - summary["accuracy"]
        summary[f"best_gain@{k}"] = summary[f"best_of_{k}"] - summary["accuracy"]
    summary["per_seed"] = per_seed(rows, options)
    summary.update(checkpoint=output["checkpoint"], prompt_format=output["prompt_format"],
                   generation_seconds=output["seconds"], generated_tokens=output["tokens"],
                   tokens_per_second=output["tokens"] / output["seconds"] if output["seconds"] else None,
                   samples=list(options.samples), temperature=options.temperature, seed=options.seed,
                   sample_seeds=options.sample_seeds, bootstrap_draws=options.bootstrap)
    other_rows = None
    if compare_to is not None:
        other = run_model(compare_to, questions, options, greedy_only=True)
        other_rows = [score_question(question, greedy, None, options.samples)
                      for question, greedy in zip(questions, other["greedy"])]
        other_summary = summarise(other_rows, options.samples)
        summary["compare"] = {"checkpoint": other["checkpoint"], "prompt_format": other["prompt_format"],
                              "accuracy": other_summary["accuracy"],
                              "per_family": {name: block["accuracy"] for name, block in other_summary["per_family"].items()}}
        summary["compare_accuracy"] = other_summary["accuracy"]
        summary["accuracy_gain"] = summary["accuracy"] - other_summary["accuracy"]
    summary.update(scaling_intervals(rows, options.samples, other_rows, options.bootstrap, options.seed))
    if samples_path is not None:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        with samples_path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return summary

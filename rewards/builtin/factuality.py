"""Factuality reward: pay correct > abstained > incorrect (AA-Omniscience style, default +1 / 0 / -1).

Label format (one per dataset row):
    "Paris"                                                    a plain reference answer, or
    {"answer": "Paris", "aliases": ["City of Paris"],           aliases are optional, and
     "documents": ["Paris is the capital of France. ..."]}     documents are optional reference texts.
A dict with documents and no answer grades long answers only.

Each response is classified (lexically, or by an LLM judge when `judge_url` is given):
  * short answers: the answer (or an alias) must appear as a whole-token span of the response's answer segment,
    after normalisation (NFKC, accents, case, punctuation, articles, number words: see rewards.text_normalize).
    The answer segment is the last \\boxed{...}, else the text after the last "answer:" / "answer is", else the
    whole response; a segment longer than `max_answer_words` is judged on its last sentence only, where the
    conclusion is. Only the last final answer counts, so several boxes or "answer:" lines gain nothing.
  * one committed answer: naming the answer is not enough; the segment must commit to it alone, in the expected
    `answer_format` (part of the config; `ANSWER_FORMATS` holds the instruction to put in the task prompt):
      "short"    -- "Answer with the name, number or date only, or say you don't know." Besides the answer the
                    segment may hold only stop words, filler ("I think", "the answer is", "sorry"), hedges ("not
                    sure", "maybe") and the question's own words; anything else ("Canberra, Sydney", "Paris,
                    Texas", "Sydney. Actually Canberra.") is incorrect.
      "sentence" -- "Answer in one sentence that states a single answer, or say you don't know." Other words are
                    allowed, but not the marked candidate forms below.
    In both, a segment is incorrect when it has a question mark ("Canberra? Sydney?"), an alternative word ("or",
    "either", "alternatively", "nor", "versus"), a negation ("not Sydney", "Canberra, not Sydney", "no") or, in
    "sentence", a retraction word ("actually", "wait", "instead", "rather", "correction") or a list of short items
    ("Paris, Lyon"). That stops a policy from collecting +1 by naming every candidate. What the lexical path
    cannot decide: whether extra words in a "sentence" answer name a second candidate ("Canberra is the capital,
    though many say Sydney is" passes), whether an echoed candidate of an either-or question is an answer
    ("Sydney or Canberra?" answered "Canberra, Sydney" counts as one answer: both are the question's words),
    synonyms and paraphrases of the reference, and negation it has no word for ("far from Sydney"). The judge
    decides those; in judge mode the marked-form checks still run first, so a hedge never reaches the judge.
  * Hedging, deliberately: a response that names the right answer is correct even if it hedges ("I'm not sure,
    but I think it is Paris") -- it committed to an answer. A response counts as abstained only when it says
    nothing *besides* the abstention: after removing abstention phrases, filler ("sorry", "answer",
    "information"...), stop words and the question's own words, nothing may be left. So "I'm not sure, maybe
    Lyon" or "Lyon. Not sure though." are incorrect: if a hedged wrong guess scored 0, the policy would learn to
    prefix every guess with "I'm not sure" and never pay for a wrong one. Verbose abstentions that add other
    content also count as incorrect; that only teaches terse abstaining, which is harmless.
  * empty responses (e.g. generation ran out inside <think>) are abstained: they assert nothing.
  * long answers (label has documents, and either no answer or a response longer than `max_answer_words`):
    the response is split into sentences ("claims"; sentences with fewer than `min_claim_words` content words are
    not claims). A claim is supported when some window of two consecutive document sentences covers at least
    `support_threshold` of its content words and every number in it. The supported share s maps onto the same
    scale: score = incorrect + s * (correct - incorrect); components correct = s, incorrect = 1 - s. A long
    response that is a pure abstention, or has no claims at all, is abstained.

Components {"correct", "abstained", "incorrect"} are 0/1 for short answers, so batch means are accuracy and
abstention rate; `factuality_metrics` computes accuracy, abstention rate and hallucination rate
= incorrect / (incorrect + abstained) from a list of results. Judge failures raise `rewards.judge.JudgeError`;
the caller's reward isolation decides the fallback. The judge API key is read from the environment variable named
by `judge_api_key_env` and never appears in results, errors or logs.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from rewards.api import RewardInput, RewardResult
from rewards.judge import ChatJudge, judge_from_kwargs
from rewards.registry import register_reward
from rewards.text_normalize import (STOPWORDS, contains_span, content_words, last_boxed, remove_spans,
                                    split_sentences, strip_reasoning, tokens)

# Abstention phrases, written as they look after `tokens()` (apostrophes removed, articles dropped).
_ABSTAIN_PHRASES = [p.split() for p in """
dont know|do not know|did not know|didnt know|not know|no idea|not sure|unsure|not certain|uncertain
cannot answer|cant answer|can not answer|unable to answer|not able to answer|cannot be answered
cannot determine|cant determine|unable to determine|cannot be determined|not possible to determine
cannot say|cant say|unable to say|cannot tell|cant tell|cannot provide|cant provide|unable to provide
cannot confirm|cannot verify|unable to verify|unable to confirm|dont have enough information
do not have enough information|not enough information|insufficient information|dont have information
do not have information|no information|no reliable information|not aware|beyond my knowledge
dont recall|do not recall|cannot recall|cant recall|dont remember|do not remember|nobody knows|no 1 knows
i pass|i abstain|abstain|unknown to me|not known
""".replace("\n", "|").split("|") if p.strip()]
# Words an abstention may contain besides the phrase itself; anything else left over means the response also
# asserted something (a guess), see the module docstring.
_ABSTAIN_FILLER = frozenset("""
sorry unfortunately however apologize apologies afraid honestly really though but answer answers question
information enough sufficient reliable accurate specific exact exactly precise precisely knowledge data access
current currently able unable determine determined provide confirm verify say know sure certain confidence
confident recall remember tell find details detail regarding topic matter subject cannot cant dont doesnt im ive
id unknown unclear idea clear without further context available definitive definitively correct correctly
guess speculate speculating want wish would rather give response respond this that
""".split())
ANSWER_FORMATS = {
    "short": "Answer with the name, number or date only, or say you don't know.",
    "sentence": "Answer in one sentence that states a single answer, or say you don't know.",
}
_ALTERNATIVE_WORDS = frozenset("or either alternatively nor versus vs otherwise".split())
# After abstention phrases ("not sure", "dont know") are cut out, any of these negates or retracts something.
_NEGATORS = frozenset("""
not no never neither nor none nobody nothing isnt wasnt arent werent doesnt didnt dont cant cannot wont wouldnt
couldnt shouldnt aint hardly nope wrong incorrect false
""".split())
_RETRACTION_WORDS = frozenset("actually wait instead rather correction scratch oops retract nevermind".split())
_CONFIDENCE_PHRASES = [p.split() for p in ("no doubt", "without doubt", "without question", "no question")]
# Words a "short" answer may hold besides the answer itself (with stop words and abstention filler).
_COMMIT_FILLER = frozenset("""
think believe guess reckon suppose say would pretty fairly quite very likely probably maybe perhaps possibly
certainly definitely surely hmm well ok okay so yes final answer answers correct its thats
""".split())
_LIST_SPLIT_RE = re.compile(r"[,;/|&+\n]|\band\b", re.IGNORECASE)
_DESCRIPTIVE_RE = re.compile(r"\s*(?:a|an|the)\b", re.IGNORECASE)
_ANSWER_MARK_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)


def _parse_label(label: Any) -> tuple[list[str], list[str]]:
    """(answer variants, documents)."""
    if label is None:
        raise ValueError("factuality needs a label on every sample: a string answer or {'answer', 'aliases', "
                         "'documents'}")
    if isinstance(label, (str, int, float)):
        return [str(label)], []
    if not isinstance(label, dict):
        raise ValueError(f"factuality label must be a string or dict, got {type(label).__name__}")
    answer = label.get("answer")
    answers = [] if answer is None else [str(a) for a in (answer if isinstance(answer, list) else [answer])]
    answers += [str(a) for a in label.get("aliases") or []]
    documents = [str(d) for d in label.get("documents") or []]
    if not answers and not documents:
        raise ValueError("factuality label dict needs an 'answer' or 'documents'")
    return answers, documents


def _question_text(prompt: Any) -> str:
    """The last user turn of a chat prompt (or the prompt string): what the judge and the abstention rule read."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role", "user") == "user":
                content = message.get("content", "")
                if isinstance(content, list):  # multi-part content: keep the text parts
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                return str(content)
    return "" if prompt is None else str(prompt)


def _answer_segment(text: str, max_words: int) -> str:
    boxed = last_boxed(text)
    if boxed is not None:
        return re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", boxed)
    marks = list(_ANSWER_MARK_RE.finditer(text))
    segment = text[marks[-1].end():] if marks else text
    if len(tokens(segment)) > max_words:
        sentences = split_sentences(segment)
        segment = sentences[-1] if sentences else segment
    return segment


def _not_one_answer(segment: str, variants: list[list[str]], question: str, answer_format: str) -> str | None:
    """Why a segment that names the answer does not commit to it alone (None when it does); module doc."""
    if "?" in segment or "\uff1f" in segment:
        return "asks rather than answers (question mark)"
    rest = remove_spans(remove_spans(tokens(segment), variants), _ABSTAIN_PHRASES + _CONFIDENCE_PHRASES)
    words = set(rest)
    if words & _ALTERNATIVE_WORDS:
        return "offers alternatives besides the answer"
    asked = set(tokens(question))
    if words & _NEGATORS - asked:  # "Which city is not in France?" may be answered "Berlin is not in France."
        return "negates or retracts something besides the answer"
    if answer_format == "short":
        extra = [t for t in rest if t not in STOPWORDS and t not in _ABSTAIN_FILLER and t not in _COMMIT_FILLER
                 and t not in asked]
        if extra:
            return f"says more than the answer ({' '.join(extra[:5])}); the expected format is the answer only"
        return None
    if words & _RETRACTION_WORDS:
        return "retracts or replaces an answer"
    parts = [part for part in _LIST_SPLIT_RE.split(segment) if tokens(part)]
    candidates = [part for part in parts if len(tokens(part)) <= 4 and any(t not in asked for t in tokens(part))]
    # Two short items are a list too ("Paris, Lyon"), unless one describes the other ("Canberra, a planned city").
    described = any(_DESCRIPTIVE_RE.match(part) or any(t in STOPWORDS for t in tokens(part)) for part in parts)
    if len(candidates) >= 3 or (len(candidates) == 2 and len(parts) == 2 and not described):
        return "lists candidates"
    return None


def _has_abstention(text_tokens: list[str]) -> bool:
    return any(contains_span(text_tokens, phrase) for phrase in _ABSTAIN_PHRASES)


def _is_pure_abstention(text_tokens: list[str], question: str) -> bool:
    if not _has_abstention(text_tokens):
        return False
    asked = set(tokens(question))
    leftover = [t for t in remove_spans(text_tokens, _ABSTAIN_PHRASES)
                if t not in STOPWORDS and t not in _ABSTAIN_FILLER and t not in asked]
    return not leftover


def classify_short(response: str, answers: list[str], question: str = "", *, max_answer_words: int = 64,
                   answer_format: str = "short") -> tuple[str, str]:
    """(verdict, reason) for a short-answer response, lexically; verdict is correct / abstained / incorrect."""
    text = strip_reasoning(response)
    text_tokens = tokens(text)
    if not text_tokens:
        return "abstained", "empty response"
    variants = [v for v in (tokens(a) for a in answers) if v]
    segment = _answer_segment(text, max_answer_words)
    seg_tokens = tokens(segment)
    if any(contains_span(seg_tokens, v) for v in variants):
        why = _not_one_answer(segment, variants, question, answer_format)
        if why is not None:
            return "incorrect", why
        return "correct", "hedged but names the answer" if _has_abstention(text_tokens) else "names the answer"
    if _is_pure_abstention(text_tokens, question):
        return "abstained", "abstention phrase and nothing else"
    if _has_abstention(text_tokens):
        return "incorrect", "hedged guess without the answer"
    return "incorrect", "does not name the answer"


def _document_windows(documents: list[str]) -> list[tuple[set[str], set[str]]]:
    """(content words, numbers) of every window of two consecutive sentences of every document."""
    windows = []
    for doc in documents:
        sentences = split_sentences(doc) or [doc]
        for i in range(len(sentences)):
            words = content_words(" ".join(sentences[i:i + 2]))
            windows.append((words, {w for w in words if w[0].isdigit()}))
    return windows


def extract_claims(response: str, min_claim_words: int = 2) -> list[str]:
    return [s for s in split_sentences(strip_reasoning(response)) if len(content_words(s)) >= min_claim_words]


def claim_support(claims: list[str], documents: list[str], support_threshold: float = 0.6) -> list[bool]:
    windows = _document_windows(documents)
    flags = []
    for claim in claims:
        words = content_words(claim)
        numbers = {w for w in words if w[0].isdigit()}
        flags.append(any(numbers <= nums and len(words & doc) >= support_threshold * len(words)
                         for doc, nums in windows))
    return flags


_SHORT_JUDGE_PROMPT = """You grade one answer to a factual question against the reference answer.
The question asked for this format: {answer_format}
Reply with exactly one word:
CORRECT if the response commits to exactly one answer and it matches the reference (or one of its aliases),
INCORRECT if it commits to a different answer, names several candidates in any form (a list, question marks,
"X or Y", "X, not Y", a retraction followed by another answer), or guesses wrongly while hedging,
ABSTAINED if it declines to answer (says it does not know) without giving any answer."""
_CLAIMS_JUDGE_PROMPT = """You check numbered claims against reference documents.
For every claim write one line "<number>: SUPPORTED" or "<number>: UNSUPPORTED". A claim is SUPPORTED only if the
documents state or directly imply it. Write nothing else."""


async def _judge_short(judge: ChatJudge, question: str, answers: list[str], response: str,
                       answer_format: str) -> str:
    reference = answers[0] + (f" (also accepted: {'; '.join(answers[1:])})" if len(answers) > 1 else "")
    user = f"Question: {question}\nReference answer: {reference}\nResponse: {strip_reasoning(response)}\nVerdict:"
    system = _SHORT_JUDGE_PROMPT.format(answer_format=ANSWER_FORMATS[answer_format])
    return await judge.ask_verdict([{"role": "system", "content": system}, {"role": "user", "content": user}])


def marked_hedge(response: str, answers: list[str], question: str, max_answer_words: int) -> str | None:
    """Why the response's answer segment offers several candidates in a marked form (question marks, alternative
    words, negation, retraction, a list), or None: the checks that run before a judge is asked."""
    segment = _answer_segment(strip_reasoning(response), max_answer_words)
    return _not_one_answer(segment, [v for v in (tokens(a) for a in answers) if v], question, "sentence")


async def _judge_claims(judge: ChatJudge, claims: list[str], documents: list[str]) -> list[bool]:
    docs = "\n\n".join(f"[Document {i + 1}]\n{d}" for i, d in enumerate(documents))
    numbered = "\n".join(f"{i + 1}: {c}" for i, c in enumerate(claims))
    return await judge.ask_claim_labels([{"role": "system", "content": _CLAIMS_JUDGE_PROMPT},
                                         {"role": "user", "content": f"{docs}\n\nClaims:\n{numbered}"}],
                                        len(claims))


def _verdict_result(verdict: str, payoff: dict[str, float], info: dict[str, Any]) -> RewardResult:
    components = {name: float(name == verdict) for name in ("correct", "abstained", "incorrect")}
    return RewardResult(payoff[verdict], components, {"verdict": verdict, **info})


_EXAMPLE_Q = [{"role": "user", "content": "What is the capital of France?"}]


@register_reward("factuality", examples=[
    RewardInput(_EXAMPLE_Q, "The capital of France is Paris.", {"answer": "Paris", "aliases": ["City of Paris"]}),
    RewardInput(_EXAMPLE_Q, "I'm not sure.", "Paris"),
    RewardInput(_EXAMPLE_Q, "Lyon", "Paris"),
    RewardInput("Tell me about the Eiffel Tower.", "It is in Paris. It was completed in 1925.",
                {"documents": ["The Eiffel Tower is in Paris. It was completed in 1889."]}),
], batch_metrics=lambda components: factuality_metrics(components))  # defined below; looked up per call
async def factuality(sample: RewardInput, *, correct: float = 1.0, abstain: float = 0.0, incorrect: float = -1.0,
                     answer_format: str = "short", max_answer_words: int = 64, support_threshold: float = 0.6,
                     min_claim_words: int = 2,
                     judge_url: str | None = None, judge_model: str | None = None,
                     judge_api_key_env: str = "OPENAI_API_KEY", judge_timeout_s: float = 60.0,
                     judge_max_retries: int = 2) -> RewardResult:
    """Correct / abstained / incorrect payoff for short answers, supported-claim share for long ones."""
    if not (correct > incorrect and incorrect <= abstain <= correct):
        raise ValueError(f"factuality payoffs must satisfy correct >= abstain >= incorrect and correct > "
                         f"incorrect; got {correct} / {abstain} / {incorrect}")
    payoff = {"correct": float(correct), "abstained": float(abstain), "incorrect": float(incorrect)}
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"factuality answer_format must be one of {sorted(ANSWER_FORMATS)}, got {answer_format!r}")
    answers, documents = _parse_label(sample.label)
    question = _question_text(sample.prompt)
    judge = judge_from_kwargs(judge_url, judge_model, judge_api_key_env, timeout_s=judge_timeout_s,
                              max_retries=judge_max_retries)
    method = "judge" if judge else "lexical"
    text = strip_reasoning(sample.response)
    text_tokens = tokens(text)

    long_form = bool(documents) and (not answers or len(text_tokens) > max_answer_words)
    if not long_form:
        hedge = marked_hedge(sample.response, answers, question, max_answer_words) if judge is not None else None
        if hedge is not None:
            verdict, reason, method = "incorrect", hedge, "lexical"
        elif judge is not None:
            verdict = await _judge_short(judge, question, answers, sample.response, answer_format)
            reason = "judge verdict"
        else:
            verdict, reason = classify_short(sample.response, answers, question, max_answer_words=max_answer_words,
                                             answer_format=answer_format)
        return _verdict_result(verdict, payoff, {"mode": "short", "method": method, "reason": reason})

    if not text_tokens or _is_pure_abstention(text_tokens, question):
        return _verdict_result("abstained", payoff, {"mode": "claims", "method": "lexical",
                                                     "reason": "empty or pure abstention"})
    claims = extract_claims(text, min_claim_words)
    if not claims:
        return _verdict_result("abstained", payoff, {"mode": "claims", "method": "lexical",
                                                     "reason": "no checkable claims"})
    if judge is not None:
        flags = await _judge_claims(judge, claims, documents)
    else:
        flags = claim_support(claims, documents, support_threshold)
    share = sum(flags) / len(claims)
    score = payoff["incorrect"] + share * (payoff["correct"] - payoff["incorrect"])
    components = {"correct": share, "abstained": 0.0, "incorrect": 1.0 - share,
                  "supported_share": share, "claims": float(len(claims))}
    info = {"mode": "claims", "method": method, "verdict": "claims",
            "unsupported_claims": [c for c, ok in zip(claims, flags) if not ok][:5]}
    return RewardResult(score, components, info)


def factuality_metrics(results: Iterable[RewardResult | dict[str, float]]) -> dict[str, float]:
    """Accuracy, abstention rate, hallucination rate (= incorrect / (incorrect + abstained)) and the
    AA-Omniscience-style index 100 * (correct - incorrect) / n, from results or their component dicts.

    Results without the three components (e.g. a caller's fallback after a judge failure) are not counted; `n` says
    how many were. Rates over nothing are 0.
    """
    totals = {"correct": 0.0, "abstained": 0.0, "incorrect": 0.0}
    n = 0
    for result in results:
        components = result.components if isinstance(result, RewardResult) else result
        if not all(k in components for k in totals):
            continue
        n += 1
        for k in totals:
            totals[k] += components[k]
    wrong_or_abstained = totals["incorrect"] + totals["abstained"]
    return {
        "n": float(n),
        "accuracy": totals["correct"] / n if n else 0.0,
        "abstention_rate": totals["abstained"] / n if n else 0.0,
        "incorrect_rate": totals["incorrect"] / n if n else 0.0,
        "hallucination_rate": totals["incorrect"] / wrong_or_abstained if wrong_or_abstained else 0.0,
        "omniscience_index": 100.0 * (totals["correct"] - totals["incorrect"]) / n if n else 0.0,
    }

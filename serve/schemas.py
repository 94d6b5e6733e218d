"""The HTTP contract of the classifier service: request and response bodies, and input checks.

Kept free of Ray and torch so that clients, tests and the deploy task can import it cheaply.

The body of ``POST /v1/predict`` is parsed and checked here, by :func:`parse_predict_body`, not by
FastAPI: the checks run only after the bearer token was checked, stop early on bodies that are too
big or have too many texts, and report at most :data:`MAX_PROBLEMS` problems in a bounded error
body. The OpenAPI document states the same rules (:func:`predict_request_schema`), so a client
generated from it (or a schema-driven fuzzer) sends only what the service accepts.

Limits (set per deployment in ``user_config``, see ``serve/config.yaml``):

* exactly one of ``texts`` (a list of strings) or ``text`` (a string);
* at most ``max_texts_per_request`` texts per request (more: HTTP 413);
* every text has a non-whitespace character (else 422);
* at most ``max_text_chars`` characters per text: a longer text is **rejected** (422), not cut,
  so a client never gets a prediction for text the model did not see. The same bound is the data
  gate's ``CT_MAX_TEXT_CHARS``, so the service accepts what training accepts. Within that bound
  the tokenizer truncates to the model's ``max_length`` tokens, exactly as in training;
* every text is valid Unicode: JSON can carry lone surrogate escapes (``"\\ud800"``), which no
  tokenizer reads; they get a 422 naming the text, and never reach a batch shared with others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ml.serve_options import ServeOptions  # noqa: F401  (re-exported: the user_config schema, shared with ml.rollout)

MAX_PROBLEMS = 10  # problems listed in one error response; the rest are counted
MAX_PROBLEM_CHARS = 240  # one problem's message
QUOTE_CHARS = 40  # characters of client input quoted back in a message
# A text must contain a character outside this set: the union of what Python (str.isspace), ECMA
# and Rust regexes call whitespace, spelled out so that this service and a client or validator
# reading the OpenAPI pattern agree on every text (their own \\S disagree on U+001C-1F, U+FEFF).
BLANK_PATTERN = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
REQUEST_ID_PATTERN = r"^[!-~]{1,128}$"  # X-Request-ID: 1-128 visible ASCII characters
_NON_BLANK = re.compile(BLANK_PATTERN)
_SURROGATE = re.compile("[\ud800-\udfff]")
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
BODY_FIELDS = ("texts", "text", "return_all_scores")


class PredictRequest(BaseModel):
    """Either ``texts`` (a list) or ``text`` (one string); documentation of the body's fields.

    The limits in the OpenAPI document come from the deployment (:func:`predict_request_schema`).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": ["Stocks rally as the Fed holds rates.", "Late goal sends City top."]},
                {"text": "NASA launches a new Mars rover.", "return_all_scores": True},
            ]
        },
    )

    texts: list[str] | None = Field(None, description="Texts to classify, in order.")
    text: str | None = Field(None, description="A single text (instead of `texts`).")
    return_all_scores: bool = Field(False, description="Also return every class's probability.")


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Probability of `label`.")
    scores: dict[str, float] | None = Field(None, description="Every class's probability (if asked).")


class ModelRef(BaseModel):
    """A model's identity: registered name, version, and the training run that made it.

    A version number alone is not an identity: two registered models both have a version 2, and a
    recreated registry reuses numbers.
    """

    name: str
    version: str
    run_id: str | None = Field(None, description="MLflow run that trained it (absent for a local path).")


class PredictResponse(BaseModel):
    model: ModelRef = Field(description="The model that answered (also the X-Model-Version header).")
    role: str = Field(
        "champion",
        description="`champion`, or `canary` when a candidate under a canary rollout answered (sticky per "
        "X-Client-Key header, else per request id).",
    )
    request_id: str
    predictions: list[Prediction]


class CandidateInfo(BaseModel):
    """A candidate beside the serving model during a staged rollout (shadow or canary)."""

    name: str
    version: str | None = Field(None, description="Null while it loads or when it failed to load.")
    run_id: str | None = None
    requested: str = Field(description="name@version in user_config.candidate.")
    mode: str = Field(description="`shadow` (mirrored copies, answers logged only) or `canary`.")
    fraction: float = Field(description="canary: share of client keys it answers.")
    client_key_header: str
    loaded_at: str | None = None
    load_error: str | None = Field(None, description="Why it failed to load; the serving model is untouched.")
    shadow: dict[str, int] | None = Field(
        None, description="shadow: texts mirrored, answered, failed and dropped (queue full) by this replica."
    )


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: one readable line, and the first problems when there are several."""

    detail: str
    problems: list[str] | None = Field(None, description=f"At most {MAX_PROBLEMS} problems, in body order.")
    more_problems: int | None = Field(None, description="Problems found beyond the ones listed.")


class ModelInfo(BaseModel):
    name: str
    version: str
    labels: list[str]
    run_id: str | None = None
    source: str = Field(description="Where the weights came from (models:/name/version or a path).")
    max_length: int = Field(description="Tokens per text the model reads; the rest is truncated.")
    device: str
    dtype: str
    loaded_at: str
    requested: str = Field(description="The reference in user_config (name@version, an alias or a path).")
    last_load_error: str | None = Field(
        None, description="Why the last requested model failed to load (the previous one kept serving)."
    )
    failed_request: str | None = Field(
        None, description="The reference (name@version) whose load failed, if the last load failed."
    )
    limits: dict[str, Any]
    candidate: CandidateInfo | None = Field(None, description="A candidate in shadow or canary, if any.")
    history: list[dict[str, Any]] | None = Field(
        None,
        description="The model's last serving-history entries, newest first (ml/serving_history.py: "
        "action, from_version, to_version, result, at, actor, reason, seconds, detail); null when "
        "the history could not be read just now.",
    )


class ServedModel(BaseModel):
    """One Serve application of this service (one per dataset) and the model it serves."""

    app: str = Field(
        description="The Serve application: 'classifier' for the default dataset, else the dataset."
    )
    dataset: str | None = Field(None, description="The dataset whose model it serves.")
    registered_model: str | None = Field(
        None, description="MLflow registered model (`<dataset>-classifier`)."
    )
    version: str | None = Field(None, description="The version served; null while none is loaded.")
    run_id: str | None = Field(None, description="MLflow run that trained the served version.")
    route_prefix: str = Field(description="Serve's route prefix: `POST <route_prefix>/v1/predict`.")
    routes: list[str] = Field(
        description="Every prefix it answers under: the default application also answers under /<dataset>."
    )
    default: bool = Field(description="The deployment's default dataset (application 'classifier', route /).")
    status: str = Field(
        description="Serve's application status: RUNNING, DEPLOYING, UNHEALTHY, DEPLOY_FAILED ..."
    )
    message: str | None = Field(None, description="Serve's message for that status, if any.")
    last_load_error: str | None = Field(
        None, description="Why its last requested model failed to load (the previous one kept serving)."
    )
    candidate: dict[str, Any] | None = Field(
        None, description="A candidate in a staged rollout: name, version, mode (shadow/canary), fraction."
    )
    error: str | None = Field(
        None,
        description="Why the application could not say what it serves (no answer within the timeout, no "
        "replica, ...); the other applications are listed regardless.",
    )


class ServedModels(BaseModel):
    """``GET /v1/models``: every application of this service, from Serve's own state."""

    default_dataset: str = Field(description="The dataset served at route / (CT_SERVE_DEFAULT_DATASET).")
    models: list[ServedModel]


class InputError(Exception):
    """A request the service refuses: status code, a message, and the problems behind it."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None, more: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems
        self.more = more

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"detail": _cut(self.message, 2 * MAX_PROBLEM_CHARS)}
        if self.problems and len(self.problems) + self.more > 1:
            body["problems"] = [_cut(p, MAX_PROBLEM_CHARS) for p in self.problems[:MAX_PROBLEMS]]
            more = self.more + max(0, len(self.problems) - MAX_PROBLEMS)
            if more:
                body["more_problems"] = more
        return body


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """Client input quoted for an error message: ASCII-only (lone surrogates included) and short."""
    text = value if isinstance(value, str) else repr(value)
    cut = text[:limit]
    return json.dumps(cut, ensure_ascii=True) + ("…" if len(text) > limit else "")


def _cut(message: str, limit: int) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", dict: "object"}.get(
        type(value), {list: "list", str: "string"}.get(type(value), type(value).__name__)
    )


def check_text(where: str, value: Any, max_chars: int) -> str | None:
    """The problem with one text, or None if the service can classify it."""
    if not isinstance(value, str):
        return f"{where} must be a string, got {_type_name(value)}"
    if len(value) > max_chars:
        return f"{where} has {len(value)} characters; the limit is {max_chars}: longer texts are rejected"
    if not _NON_BLANK.search(value):
        return f"{where} is empty or whitespace only"
    if (bad := _SURROGATE.search(value)) is not None:
        return (
            f"{where} is not valid Unicode text: a lone surrogate (U+{ord(bad.group()):04X}) at character "
            f"{bad.start()}; send UTF-8 text"
        )
    return None


@dataclass(frozen=True)
class ParsedRequest:
    texts: list[str]
    return_all_scores: bool


def parse_predict_body(raw: bytes, max_texts: int, max_chars: int) -> ParsedRequest:
    """The body of ``POST /v1/predict``, checked; :class:`InputError` (400/413/422) otherwise.

    Cheap on hostile bodies: a list longer than ``max_texts`` is refused before its items are
    looked at, and only the first :data:`MAX_PROBLEMS` problems are described.
    """
    if not raw.strip():
        raise InputError(422, 'the body is empty: send JSON like {"texts": ["..."]}')
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as err:
        raise InputError(
            400, f"malformed JSON: the body is not UTF-8 ({err.reason} at byte {err.start})"
        ) from None
    except json.JSONDecodeError as err:
        raise InputError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except (ValueError, RecursionError) as err:  # nesting too deep, a number too long ...
        raise InputError(400, f"malformed JSON: {type(err).__name__}: {_cut(str(err), 120)}") from None
    if not isinstance(body, dict):
        raise InputError(
            422, f'the body must be a JSON object like {{"texts": ["..."]}}, got {_type_name(body)}'
        )

    problems: list[str] = []
    unknown = [key for key in body if key not in BODY_FIELDS]
    problems += [
        f"unknown field {quote(key)}: the body takes 'texts' or 'text', and 'return_all_scores'"
        for key in unknown[:MAX_PROBLEMS]
    ]
    more = max(0, len(unknown) - MAX_PROBLEMS)
    if ("texts" in body) == ("text" in body):
        problems.append("give exactly one of 'texts' (a list of strings) or 'text' (a string)")

    texts: list[Any] = []
    if "texts" in body:
        value = body["texts"]
        if not isinstance(value, list):
            problems.append(f"texts must be a list of strings, got {_type_name(value)}")
        elif not value:
            problems.append("'texts' is empty: send at least one text")
        elif len(value) > max_texts:
            raise InputError(
                413,
                f"{len(value)} texts in one request; the limit is {max_texts}: "
                "split it into several requests",
            )
        else:
            texts = value
            for i, item in enumerate(value):
                if (problem := check_text(f"texts[{i}]", item, max_chars)) is not None:
                    if len(problems) < MAX_PROBLEMS:
                        problems.append(problem)
                    else:
                        more += 1
    if "text" in body:
        texts = [body["text"]]
        if (problem := check_text("text", body["text"], max_chars)) is not None:
            problems.append(problem)
    all_scores = body.get("return_all_scores", False)
    if not isinstance(all_scores, bool):
        problems.append(f"return_all_scores must be true or false, got {_type_name(all_scores)}")

    if problems:
        first = (
            problems[0] if len(problems) + more == 1 else f"{len(problems) + more} problems: {problems[0]}; …"
        )
        raise InputError(422, first, problems, more)
    return ParsedRequest(texts=texts, return_all_scores=all_scores)


def max_body_bytes(max_texts: int, max_chars: int) -> int:
    """The largest body a valid request can need: every character escaped as a surrogate pair."""
    return max_texts * (12 * max_chars + 8) + 4096


def check_request_id(value: str | None) -> str | None:
    """A client's ``X-Request-ID`` if it is well-formed (it goes into logs and the prediction log)."""
    if value is None:
        return None
    if not _REQUEST_ID.match(value):
        raise InputError(
            400,
            "X-Request-ID must be 1 to 128 visible ASCII characters, "
            f"got {quote(value)} ({len(value)} characters)",
        )
    return value


def predict_request_schema(max_texts: int, max_chars: int) -> dict[str, Any]:
    """JSON Schema of the body of ``POST /v1/predict`` with the deployment's limits."""
    text = {
        "type": "string",
        "minLength": 1,
        "maxLength": max_chars,
        "pattern": BLANK_PATTERN,
        "description": f"Text to classify: 1-{max_chars} characters, not all whitespace, valid Unicode.",
    }
    return {
        "title": "PredictRequest",
        "description": "Exactly one of `texts` or `text`.",
        "type": "object",
        "properties": {
            "texts": {
                "type": "array",
                "items": text,
                "minItems": 1,
                "maxItems": max_texts,
                "description": f"Texts to classify, in order (1-{max_texts}).",
            },
            "text": {**text, "description": "A single text (instead of `texts`)."},
            "return_all_scores": {
                "type": "boolean",
                "default": False,
                "description": "Also return every class's probability.",
            },
        },
        "additionalProperties": False,
        "oneOf": [{"required": ["texts"]}, {"required": ["text"]}],
        "examples": PredictRequest.model_config["json_schema_extra"]["examples"],
    }

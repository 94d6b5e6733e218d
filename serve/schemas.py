"""The HTTP contract of the classifier service: request and response bodies, and input checks.

Kept free of Ray and torch so that clients, tests and the deploy task can import it cheaply.

Limits (set per deployment in ``user_config``, see ``serve/config.yaml``):

* at most ``max_texts_per_request`` texts per request (more: HTTP 413);
* every text non-empty after stripping whitespace (else 422);
* at most ``max_text_chars`` characters per text: a longer text is **rejected** (422), not cut,
  so a client never gets a prediction for text the model did not see. The same bound is the data
  gate's ``CT_MAX_TEXT_CHARS``, so the service accepts what training accepts. Within that bound
  the tokenizer truncates to the model's ``max_length`` tokens, exactly as in training.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr


class PredictRequest(BaseModel):
    """Either ``texts`` (a list) or ``text`` (one string)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"texts": ["Stocks rally as the Fed holds rates.", "Late goal sends City top."]},
                {"text": "NASA launches a new Mars rover.", "return_all_scores": True},
            ]
        },
    )

    texts: list[StrictStr] | None = Field(None, description="Texts to classify, in order.")
    text: StrictStr | None = Field(None, description="A single text (instead of `texts`).")
    return_all_scores: StrictBool = Field(False, description="Also return every class's probability.")

    def items(self) -> list[str]:
        if (self.texts is None) == (self.text is None):
            raise InputError(422, "give exactly one of 'texts' (a list of strings) or 'text' (a string)")
        return [self.text] if self.text is not None else list(self.texts or [])


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Probability of `label`.")
    scores: dict[str, float] | None = Field(None, description="Every class's probability (if asked).")


class ModelRef(BaseModel):
    name: str
    version: str


class PredictResponse(BaseModel):
    model: ModelRef
    request_id: str
    predictions: list[Prediction]


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
    requested: str = Field(description="The reference in user_config (a version, an alias or a path).")
    last_load_error: str | None = Field(
        None, description="Why the last requested model failed to load (the previous one kept serving)."
    )
    limits: dict[str, Any]


class InputError(Exception):
    """A request the service refuses: status code and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_texts(texts: list[str], max_texts: int, max_chars: int) -> list[str]:
    """Apply the request limits; raise :class:`InputError` naming the first offending text."""
    if not texts:
        raise InputError(422, "'texts' is empty: send at least one text")
    if len(texts) > max_texts:
        raise InputError(
            413,
            f"{len(texts)} texts in one request; the limit is {max_texts}: split it into several requests",
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise InputError(422, f"texts[{i}] is empty or whitespace only")
        if len(text) > max_chars:
            raise InputError(
                422,
                f"texts[{i}] has {len(text)} characters; the limit is {max_chars}: longer texts are rejected",
            )
    return texts


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """FastAPI/pydantic validation errors as one status and one readable message.

    Malformed JSON is a 400; a well-formed body of the wrong shape is a 422.
    """
    problems = []
    status = 422
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".") or "body"
        kind = err.get("type", "")
        if kind == "json_invalid":
            status = 400
            problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        elif kind == "missing" and where == "body":
            problems.append('the body is empty: send JSON like {"texts": ["..."]}')
        elif kind == "string_type":
            got = type(err.get("input")).__name__ if err.get("input") is not None else "null"
            problems.append(f"{where} must be a string, got {got}")
        elif kind == "list_type":
            problems.append(f"{where} must be a list of strings")
        elif kind == "extra_forbidden":
            problems.append(
                f"unknown field {where!r}: the body takes 'texts' or 'text', and 'return_all_scores'"
            )
        elif kind in {"model_attributes_type", "model_type"}:
            problems.append('the body must be a JSON object like {"texts": ["..."]}')
        else:
            problems.append(f"{where}: {err.get('msg')}")
    return status, "; ".join(problems) or "invalid request"


class ServeOptions(BaseModel):
    """The deployment's ``user_config``: which model, batching, limits, device, data capture.

    Changing it redeploys in place: each replica loads the new model beside the old one and swaps
    only when it loaded; a model that fails to load leaves the old one serving.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field("", description="Registered model; empty = CT_REGISTERED_MODEL's default.")
    model_version: str = Field("champion", description="A version number or an alias (resolved at load).")
    model_path: str = Field("", description="Load an export directory instead of the registry (benchmarks).")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Texts per forward pass (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.1, ge=0, le=10, description="How long a batch waits to fill.")
    max_texts_per_request: int = Field(64, ge=1, le=10_000)
    max_text_chars: int = Field(10_000, ge=1, description="Longer texts are rejected with a 422.")
    return_all_scores: bool = Field(False, description="Default for requests that do not say.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ...; empty = a GPU if there is one.")
    dtype: str | None = Field(
        None, description="float32 / float16 / bfloat16; empty = fp16 on GPU, fp32 on CPU."
    )
    torch_threads: int = Field(0, ge=0, description="CPU threads for inference; 0 = the replica's CPUs.")
    prediction_log: bool = Field(True, description="Append every prediction to s3://<bucket>/predictions/.")
    prediction_log_flush_s: float = Field(5.0, gt=0, description="Data capture flush interval.")
    prediction_log_max_rows: int = Field(10_000, ge=1, description="Data capture buffer bound (then drop).")

    def reference(self) -> str:
        return self.model_path or f"{self.model_name or '<default>'}@{self.model_version}"

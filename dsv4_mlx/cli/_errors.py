"""Turning exceptions into one clear line and a hint (the CLI never shows a traceback by default)."""

from __future__ import annotations

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell convention for "ended by SIGINT"

HINT_MODEL = ("MODEL is a DeepSeek-V4 checkpoint folder (config.json + *.safetensors) or a Hub repo id; "
              "leave it out to run the bundled demo model")
HINT_CONFIG = ("dsv4 runs DeepSeek-V4 (Flash / Pro) checkpoints only; check the folder's config.json, "
               "or download the checkpoint again")
HINT_MEMORY = ("ask for less context (--max-context), close other programs, or use a smaller recipe "
               "(dsv4 convert --recipe ...)")
HINT_PLAN = ("`dsv4 info MODEL` shows which recipe fits which Mac; make one with "
             "`dsv4 convert SOURCE OUT --recipe NAME`")
HINT_CONTEXT = "/reset (in the chat) starts a new conversation; --max-context sets the cap"
HINT_SESSION = "a saved session or cache loads only into the model and checkpoint it was saved with"
HINT_HUB = "check the repo id and your network; gated repos need `hf auth login` or HF_TOKEN"
HINT_DEBUG = "run again with `dsv4 --debug ...` to see the full traceback"


class CliError(Exception):
    """A failure the CLI detects itself, with the hint to show under it."""

    def __init__(self, message: str, hint: str = HINT_DEBUG) -> None:
        super().__init__(message)
        self.hint = hint


def describe_error(error: BaseException) -> tuple[str, str]:
    """(message, hint) for any exception; known kinds get a specific hint. Never raises: a bug
    here must not turn a clear error into a traceback."""
    try:
        return _describe(error)
    except Exception:  # noqa: BLE001
        return f"{type(error).__name__}: {error}", HINT_DEBUG


def _describe(error: BaseException) -> tuple[str, str]:
    from ..checkpoint import CheckpointError
    from ..model import ConfigError

    message = str(error) or type(error).__name__
    if isinstance(error, CliError):
        return message, error.hint
    if isinstance(error, CheckpointError):
        return message, HINT_MODEL
    if isinstance(error, ConfigError):
        return f"not a usable DeepSeek-V4 config: {message}", HINT_CONFIG
    kind = _engine_error_hint(error)
    if kind is not None:
        return message, kind
    if _is_memory_error(error):
        return message if not isinstance(error, MemoryError) else "out of memory", HINT_MEMORY
    if _is_hub_error(error):
        return f"cannot get the model from the Hugging Face Hub: {message.splitlines()[0]}", HINT_HUB
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return message, HINT_MODEL if "tokenizer" in message or "config" in message else HINT_DEBUG
    return f"{type(error).__name__}: {message.splitlines()[0]}", HINT_DEBUG


def _engine_error_hint(error: BaseException) -> str | None:
    """The hint for the memory planner's and the prompt cache's own errors."""
    from ..planner import ContextLimitError, MemoryPlanError
    from ..prompt_cache import CacheMismatchError

    hints = {MemoryPlanError: HINT_PLAN, ContextLimitError: HINT_CONTEXT, CacheMismatchError: HINT_SESSION}
    return next((hint for kind, hint in hints.items() if isinstance(error, kind)), None)


def _is_memory_error(error: BaseException) -> bool:
    """MemoryError, or MLX failing to allocate."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("malloc" in text or "out of memory" in text)


def _is_hub_error(error: BaseException) -> bool:
    try:
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    except ImportError:  # an older huggingface_hub: no such errors to recognise
        return False
    return isinstance(error, (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError))

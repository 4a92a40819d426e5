"""A hub id that cannot be used fails within seconds, in one line, before transformers tries it.

transformers fetches each file of a hub id with huggingface_hub's download, which retries a failed
connection five times with back-off (1 + 2 + 4 + 8 + 8 s): about 25 s per file, ~50 s for a
tokenizer and a model, then an error that does not say what to do instead. One metadata request
through huggingface_hub's own ``model_info`` (no retries, a short timeout) tells the cases apart
first: the hub is unreachable, it does not know the id, or access is switched off
(``HF_HUB_OFFLINE``). A repository already in the local hub cache is left to transformers.
Hub datasets (``--data owner/name``) get the same check before ``datasets.load_dataset``; one
already in the datasets or hub cache is left to ``datasets`` (it falls back to that copy).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, dataset_info, model_info, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from .errors import ModelError

HUB_TIMEOUT_S = 5.0  # one metadata request; a reachable hub answers far within this
LOCAL_HINT = "pass a local checkpoint folder (e.g. --model path/to/model, or a dpolab run directory) or 'default'"


def check_hub_id(name: str) -> None:
    """Return if hub id ``name`` can be loaded (in the hub cache, or the hub knows it); else raise
    ``ModelError`` with one line: what was tried, why it failed, and how to pass a local model."""


    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    tried = f"{name}: not a local folder and not in the hub cache"
    if constants.is_offline_mode():
        raise ModelError(f"{tried}, and hub access is off (HF_HUB_OFFLINE); {LOCAL_HINT}")
    try:
        model_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: test it first
        raise ModelError(f"{tried}; the hub repository is gated: accept its terms and log in "
                         f"(`hf auth login`), or {LOCAL_HINT}") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{tried}; the hub has no model with this id (or it is private: log in with "
                         f"`hf auth login`); {LOCAL_HINT}") from None
    except HfHubHTTPError as e:
        raise ModelError(f"{tried}; the hub answered {_first_line(e)}; {LOCAL_HINT}") from None
    except Exception as e:  # connection refused, name resolution, timeout: the transport's own errors
        raise ModelError(f"{tried}, and the hub is unreachable ({_first_line(e)}); {LOCAL_HINT}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:120]


def hub_dataset_problem(name: str) -> str | None:
    """Why hub dataset ``name`` cannot load (one clause), or None when ``datasets`` should try it."""

    import datasets  # why: 0.6 s to import, only for a hub dataset id

    cached = [Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___"),
              Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"]
    if any(p.exists() for p in cached) or constants.is_offline_mode():
        return None  # datasets loads its cached copy (offline: from the cache only, without waiting)
    try:
        dataset_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "the hub dataset is gated: accept its terms and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return "the hub has no dataset with this id (or it is private: log in with `hf auth login`)"
    except HfHubHTTPError as e:
        return f"the hub answered {_first_line(e)}"
    except Exception as e:  # the transport's own errors: refused, name resolution, timeout
        return f"the hub is unreachable ({_first_line(e)})"
    return None

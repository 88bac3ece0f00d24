"""onnxruntime-genai model folders: model.onnx (+ .data), genai_config.json, tokenizer files.

`compile_folder(folder, out, thresholds=…)` writes a new folder: a copy of the input whose decoder
model is compiled (its GroupQueryAttention nodes → TopThetaAttention, kv_layout=shared_buffer) and
whose genai_config.json loads topt's library. The library is copied into the folder and named by
a relative path: onnxruntime-genai (0.18) refuses a `custom_ops_library` outside the model folder,
the working directory and onnxruntime's own folder, and resolves relative paths against the model
folder, so the folder stays self-contained and relocatable. The input folder is only read; the
output is built in a temp dir beside it and renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from .. import get_library_path
from ..errors import ModelError, ToptError

CONFIG = "genai_config.json"
LIBRARY_KEY = "custom_ops_library"  # model.decoder.session_options.custom_ops_library


def run_model_builder(hf_folder: str | os.PathLike, output: str | os.PathLike, precision: str = "fp16",
                      provider: str = "cuda", extra_options: dict[str, str] | None = None) -> Path:
    """onnxruntime-genai's model builder on a local Hugging Face folder → a genai folder (dense).
    extra_options: the builder's --extra_options, e.g. {"prune_lm_head": "true"} (logits of the last
    position only: a batch of long prompts otherwise materialises B·S·vocab logits)."""
    import subprocess
    import sys
    output = Path(output)
    cache = output.parent / f".{output.name}.builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", os.fspath(hf_folder), "-o", os.fspath(output),
           "-p", precision, "-e", provider, "-c", os.fspath(cache)]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise ModelError(f"{hf_folder}: onnxruntime-genai's model builder failed: {e.stderr.strip().splitlines()[-1:]}") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return output


def find_folder(path: str | os.PathLike) -> Path | None:
    """The genai folder `path` is (a directory with genai_config.json) or whose decoder model it is."""
    path = Path(path)
    if path.is_dir():
        return path if (path / CONFIG).is_file() else None
    if path.is_file() and (path.parent / CONFIG).is_file():
        try:
            return path.parent if model_path(path.parent).name == path.name else None
        except ToptError:
            return None
    return None


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable genai config ({e})") from None
    if not isinstance(config.get("model", {}).get("decoder"), dict):
        raise ModelError(f"{path}: model.decoder: expected an object, got {config.get('model', {}).get('decoder')!r}")
    return config


def model_path(folder: Path) -> Path:
    """The decoder's .onnx file (model.decoder.filename)."""
    name = read_config(folder)["model"]["decoder"].get("filename")
    if not isinstance(name, str) or not (folder / name).is_file():
        raise ModelError(f"{folder / CONFIG}: model.decoder.filename: expected an .onnx file in the folder, got {name!r}")
    return folder / name


def compile_folder(folder: str | os.PathLike, output: str | os.PathLike, options=None, **kwargs):
    """Compiles the genai folder `folder` (or its model file) into the new folder `output`.

    `options`/`kwargs` as compile.compile_model's. Returns its Report, input/output the folders.
    """
    from ..compile import CompileOptions, compile_model
    source = find_folder(folder)
    if source is None:
        raise ModelError(f"{folder}: not an onnxruntime-genai folder (no {CONFIG} naming this model)")
    output = Path(output)
    if output.resolve() == source.resolve() or source.resolve() in output.resolve().parents:
        raise ModelError(f"{output}: the output folder would overwrite or sit inside the input folder {source}")
    if output.exists() and not (output / CONFIG).is_file():
        raise ModelError(f"{output}: exists and is not a genai folder: refusing to replace it")
    config = read_config(source)
    model = model_path(source)
    proto = onnx.load(model, load_external_data=False)
    _check_config(source, config, any(n.op_type == "GroupQueryAttention" for n in proto.graph.node))
    skip = {model.name, *_external_files(proto)}
    # onnx.checker cannot pass on the builder's graphs (SimplifiedLayerNormalization in the ONNX domain)
    options = dataclasses.replace(options or CompileOptions(), check=False, **kwargs)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would become the folder's mode
        for item in source.iterdir():
            if item.name not in skip:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        report = compile_model(model, tmp / model.name, options)
        library = Path(get_library_path())
        shutil.copy2(library, tmp / library.name)
        config["model"]["decoder"].setdefault("session_options", {})[LIBRARY_KEY] = library.name
        with open(tmp / CONFIG, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=4)
        _replace_dir(tmp, output)
    except OSError as e:
        raise ToptError(f"{output}: cannot write the output folder ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.input, report.output = os.fspath(folder), os.fspath(output)
    return report


def _check_config(folder: Path, config: dict, has_gqa: bool) -> None:
    where = folder / CONFIG
    share = config.get("search", {}).get("past_present_share_buffer")
    if share is False and has_gqa:
        raise ModelError(f"{where}: search.past_present_share_buffer: expected true (TopThetaAttention replaces "
                         "GroupQueryAttention in its in-place KV-buffer form), got false")
    current = config["model"]["decoder"].get("session_options", {}).get(LIBRARY_KEY)
    if current and Path(current).name != Path(get_library_path()).name:
        raise ModelError(f"{where}: model.decoder.session_options.{LIBRARY_KEY}: already set to {current!r}; "
                         "onnxruntime-genai loads one library, topt's cannot be added")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _external_files(proto: onnx.ModelProto) -> set[str]:
    """The external-data files the model refers to (the compiled model writes its own)."""
    return {entry.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


def _replace_dir(new: Path, target: Path) -> None:
    """Puts `new` at `target`; an existing target is renamed aside first and removed after."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.rename(target, old / target.name)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)

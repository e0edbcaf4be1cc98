"""Converting one checkpoint on several machines: ``defuser convert SRC DST --shards I/N`` writes
only the I-th of N parts of the output shards, into the folder ``DST.part-I-of-N`` beside DST
(written and renamed into place like DST itself), with a manifest ``defuser-part.json`` naming
the plan it belongs to; ``defuser convert SRC DST --merge`` then checks that all N parts exist
and were made from the same plan as its own, gathers their shards into DST (hard links where
the file system allows, else copies), adds the index and the other files, verifies the whole
and removes the part folders once DST is in place.

Output shard ``k`` (counted from 0) belongs to part ``k % N + 1``: parts get shards spread over
the whole model, so their sizes stay close.  The plan's fingerprint covers the source (every
tensor's name, dtype, shape and place), the direction and every output shard with its tensors,
so parts made from another source, another version of it or with other options are refused.
Tensor values are not read for it: two sources with equal headers and other values are not told
apart.  The index and the other files (config, tokenizer, ...) come from SRC at merge time, so
they may differ between the machines' copies."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defuser.offline.checkpoint import checked_file, load_json
from defuser.offline.plan import ConversionPlan
from defuser.offline.safetensors_io import OfflineConversionError

__all__ = [
    "MANIFEST_NAME",
    "Part",
    "find_parts",
    "parse_part",
    "part_folder",
    "part_shards",
    "plan_fingerprint",
    "read_manifest",
]

MANIFEST_NAME = "defuser-part.json"
_PART_NAME = re.compile(r"^(?P<stem>.+)\.part-(?P<number>\d+)-of-(?P<count>\d+)$")


@dataclass(frozen=True)
class Part:
    """Part ``number`` of ``count`` (``1 <= number <= count``)."""

    number: int
    count: int

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"


def parse_part(text: str) -> Part:
    """``"I/N"`` as a :class:`Part`; ``ValueError`` with a message for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"expected I/N (part I of N, e.g. 1/4), got {text!r}")
    number, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ValueError(f"{text!r}: N must be 1 or more")
    if not 1 <= number <= count:
        raise ValueError(f"{text!r}: I must be between 1 and N ({count})")
    return Part(number, count)


def part_folder(destination: Path, part: Part) -> Path:
    """Where part ``part`` of a conversion into ``destination`` is written."""
    return destination.with_name(f"{destination.name}.part-{part.number}-of-{part.count}")


def part_shards(plan: ConversionPlan, part: Part) -> list[int]:
    """Indices of the output shards of ``plan`` that ``part`` writes; refuses more parts than shards."""
    if part.count > len(plan.shards):
        raise OfflineConversionError(
            f"--shards {part}: the result has {len(plan.shards)} output shard(s), so it splits into at most "
            f"{len(plan.shards)} part(s)"
        )
    return [index for index in range(len(plan.shards)) if index % part.count == part.number - 1]


def plan_fingerprint(plan: ConversionPlan) -> str:
    """A digest of everything that decides the bytes of the output shards (see the module docstring)."""
    checkpoint = plan.checkpoint
    described: dict[str, Any] = {
        "reverse": plan.reverse,
        "source": [
            [key, entry.dtype, list(entry.shape), checkpoint.shard_of[key], entry.start, entry.nbytes]
            for key, entry in checkpoint.tensors.items()
        ],
        "shards": [
            [shard.name, shard.metadata, [[t.name, t.dtype, list(t.shape)] for t in shard.tensors]]
            for shard in plan.shards
        ],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def manifest(plan: ConversionPlan, part: Part) -> dict[str, Any]:
    """The manifest of ``part``: what it is, of which plan, and its shard files."""
    return {
        "part": part.number,
        "parts": part.count,
        "plan": plan_fingerprint(plan),
        "source": str(plan.source),
        "shards": [plan.shards[index].name for index in part_shards(plan, part)],
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the part folder ``folder``, checked for its fields."""
    document = load_json(checked_file(folder, MANIFEST_NAME))
    fields = {"part": int, "parts": int, "plan": str, "shards": list}
    if not isinstance(document, dict) or any(not isinstance(document.get(k), t) for k, t in fields.items()):
        raise OfflineConversionError(f"{folder / MANIFEST_NAME}: not a part manifest (needs {', '.join(fields)})")
    return document


def find_parts(plan: ConversionPlan) -> dict[int, Path]:
    """The part folders of a conversion into ``plan.destination``: all N of one count, each
    with a manifest of this plan and exactly its shards; an error names the missing, extra or
    mismatched part."""
    destination = plan.destination
    found: dict[int, set[Path]] = {}
    for path in sorted(destination.parent.iterdir()):
        match = _PART_NAME.match(path.name)
        if match and match.group("stem") == destination.name and not path.name.startswith("."):
            found.setdefault(int(match.group("count")), set()).add(path)
    if not found:
        raise OfflineConversionError(
            f"{destination}.part-I-of-N: no such part folders (made by defuser convert SRC DST --shards I/N)"
        )
    if len(found) > 1:
        counts = ", ".join(f"of-{count}" for count in sorted(found))
        raise OfflineConversionError(
            f"{destination.parent}: part folders of {destination.name} for different counts ({counts}); "
            "remove those of the other runs"
        )
    ((count, folders),) = found.items()
    for number in range(1, count + 1):
        folder = part_folder(destination, Part(number, count))
        if folder not in folders:
            part = Part(number, count)
            raise OfflineConversionError(
                f"{folder}: missing; part {part} is not converted yet (defuser convert SRC DST --shards {part})"
            )
    if count > len(plan.shards):
        raise OfflineConversionError(
            f"{destination.parent}: {count} part folders of {destination.name}, but the result has "
            f"{len(plan.shards)} output shard(s); they were made from another plan"
        )
    fingerprint = plan_fingerprint(plan)
    parts: dict[int, Path] = {}
    for number in range(1, count + 1):
        part = Part(number, count)
        folder = part_folder(destination, part)
        document = read_manifest(folder)
        if (document["part"], document["parts"]) != (number, count):
            what = f"{document['part']}/{document['parts']}"
            raise OfflineConversionError(f"{folder / MANIFEST_NAME}: says it is part {what}, its name says {part}")
        if document["plan"] != fingerprint:
            raise OfflineConversionError(
                f"{folder}: made from a different plan (source {document.get('source')!r}); its source, options "
                "or defuser's reading of it differ from this conversion's"
            )
        expected = [plan.shards[index].name for index in part_shards(plan, part)]
        if document["shards"] != expected:
            raise OfflineConversionError(f"{folder / MANIFEST_NAME}: lists shards {document['shards']}, not {expected}")
        for name in expected:
            checked_file(folder, name)
        parts[number] = folder
    return parts

"""The strict manifest loader: YAML files in a directory -> validated models, or every error at once.

Strict means: duplicate keys are errors, only YAML 1.2 core scalars are implicit (``52:54:00:12:34:56``
stays a string, ``on``/``no`` stay strings), unknown fields are errors, and every error names
``file:line:col``, the field path and what was expected. All files are read and all errors are returned
together, so one run shows everything to fix. Called by the CLI and the sync loop; pure except for reading
the files it is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ValidationError

from reconciler.errors import ConfigInvalid
from reconciler.spec.host import CONFIG_ENV, DEFAULT_CONFIG, HostConfig
from reconciler.spec.models import API_VERSION, Network, VirtualMachine
from reconciler.spec.reading import ManifestUnreadable, read_manifest

Loc = tuple[str | int, ...]
KINDS: dict[str, type[BaseModel]] = {"VirtualMachine": VirtualMachine, "Network": Network}


@dataclass(frozen=True, order=True)
class ManifestError:
    """One problem in one manifest, located as precisely as the YAML allows."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass(frozen=True)
class Source:
    file: str
    line: int
    marks: _Marks | None = field(default=None, compare=False, repr=False)  # where each field of it sits

    def at(self, *loc: str | int) -> tuple[int, int]:
        """The line and column of a field of this document (its first line when unknown)."""
        return self.marks.locate(loc) if self.marks else (self.line, 1)


@dataclass(frozen=True)
class LoadedVM:
    vm: VirtualMachine
    source: Source


@dataclass(frozen=True)
class LoadedNetwork:
    network: Network
    source: Source


@dataclass
class ManifestSet:
    """Everything one read of the manifest directory produced."""

    directory: str
    vms: dict[str, LoadedVM] = field(default_factory=dict)
    networks: dict[str, LoadedNetwork] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    failed_files: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.errors

    def digest(self) -> str:
        """A hash of the desired state (not of the files' bytes): comments and key order don't count."""
        canonical = {
            "vms": {name: loaded.vm.model_dump(mode="json") for name, loaded in sorted(self.vms.items())},
            "networks": {name: n.network.model_dump(mode="json") for name, n in sorted(self.networks.items())},
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


MAX_DEPTH = 32  # nesting levels of one document: a real manifest needs under 10


class _DepthCap:
    """A nesting cap for a composer: PyYAML's ``Composer`` composes nodes recursively, so 600 nested ``[``
    would otherwise end in a RecursionError (the scanners and parsers, Python's and libyaml's, keep explicit
    stacks; only the composer recurses). Mixed in before ``Composer``."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[attr-defined]
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  event.start_mark)
            return super().compose_node(parent, index)  # type: ignore[misc, no-any-return]
        finally:
            self._depth -= 1


class _StrictLoader(_DepthCap, yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's implicit types only (no sexagesimal ints, no yes/no/on/off,
    no YAML 1.1 leading-zero octals), as editors, ``ruamel.yaml`` and JSON Schema validators read the file,
    and the nesting cap. Pure Python: the fallback where PyYAML was built without libyaml."""


class _Composing(Protocol):
    """What ``_compose`` needs of a loader."""

    def check_node(self) -> bool: ...
    def get_node(self) -> yaml.Node | None: ...
    def get_single_node(self) -> yaml.Node | None: ...
    def dispose(self) -> None: ...


_LOADERS: list[type[yaml.resolver.Resolver]] = [_StrictLoader]
_FAST: Callable[[str], _Composing] | None = None

if yaml.__with_libyaml__:  # PyPI's wheels and Debian's python3-yaml are built with libyaml
    from yaml._yaml import CParser

    class _FastStrictLoader(_DepthCap, yaml.composer.Composer, CParser, yaml.resolver.Resolver):
        """The same rules, reading the text with libyaml's scanner and parser (C) and composing its events
        with PyYAML's own composer, so that the nesting cap, the resolvers and the marks (``file:line:col``)
        are the pure loader's. Four to six times faster on a manifest (0.45 against 2.5-3 ms on this
        project's machines): ``plan``, ``apply`` and the sync daemon parse every manifest of a host. libyaml's
        own composer is not used: it recurses in C, with no cap."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _LOADERS.append(_FastStrictLoader)
    _FAST = _FastStrictLoader


def _compose(loader_class: Callable[[str], _Composing], text: str) -> Iterator[yaml.Node | None]:
    """The composed documents of ``text``, one at a time (``yaml.compose_all``)."""
    loader = loader_class(text)
    try:
        while loader.check_node():
            yield loader.get_node()
    finally:
        loader.dispose()


def _compose_single(loader_class: Callable[[str], _Composing], text: str) -> yaml.Node | None:
    """The one document of ``text`` (``yaml.compose``: a second document is an error)."""
    loader = loader_class(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _documents(text: str) -> Iterable[yaml.Node | None]:
    """Every document of ``text``, composed with libyaml when it reads the whole text; otherwise (an error,
    or no libyaml) with the pure-Python loader, lazily, so that a text libyaml refuses gets the pure
    loader's verdict and messages: libyaml refuses some texts PyYAML reads (JSON's surrogate-pair escapes,
    ``"\\ud800\\udc00"``), and which loader PyYAML was built with must not change what a manifest means."""
    if _FAST is not None:
        try:
            return list(_compose(_FAST, text))
        except yaml.YAMLError:
            pass
    return _compose(_StrictLoader, text)


def _document(text: str) -> yaml.Node | None:
    """The one document of ``text``, like ``_documents``."""
    if _FAST is not None:
        try:
            return _compose_single(_FAST, text)
        except yaml.YAMLError:
            pass
    return _compose_single(_StrictLoader, text)


# The YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), in its order of precedence.
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
for _loader in _LOADERS:
    _loader.yaml_implicit_resolvers = {}
    for _tag, _regexp, _first in (
        ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), "tTfF"),
        ("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
        ("tag:yaml.org,2002:int", _INT_RE, "-+0123456789"),
        ("tag:yaml.org,2002:float", _FLOAT_RE, "-+0123456789."),
    ):
        _loader.add_implicit_resolver(_tag, _regexp, list(_first))


def _yaml_int(text: str) -> int:
    """A YAML 1.2 core integer: decimal (leading zeros are decimal), ``0o`` octal or ``0x`` hexadecimal."""
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


def _yaml_float(text: str) -> float:
    """A YAML 1.2 core float, including ``.inf``, ``-.inf`` and ``.nan`` (rejected later by the models)."""
    special = text.lower().lstrip("+-")
    if special in (".inf", ".nan"):
        return float(text.lower().replace(".", ""))
    return float(text)


class _YamlProblem(Exception):
    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


@dataclass
class _Marks:
    """Where each path of one document sits in the file (1-based line and column)."""

    values: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    nodes: int = 0  # how many nodes were built: aliases could otherwise expand a small file exponentially

    def locate(self, loc: Loc, prefer_key: bool = False) -> tuple[int, int]:
        for end in range(len(loc), -1, -1):
            prefix = loc[:end]
            if prefer_key and end == len(loc) and prefix in self.keys:
                return self.keys[prefix]
            if prefix in self.values:
                return self.values[prefix]
        return (1, 1)


def _pos(node: yaml.Node) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


MAX_NODES = 100_000


def _construct(node: yaml.Node, loc: Loc, marks: _Marks, active: frozenset[int] = frozenset()) -> Any:
    """Turn a composed node into plain Python data, recording marks and rejecting duplicate keys, alias
    cycles (``&a [*a]``) and alias bombs."""
    marks.values[loc] = _pos(node)
    marks.nodes += 1
    if marks.nodes > MAX_NODES:
        raise _YamlProblem(node, f"the document expands to over {MAX_NODES} values (aliases?)")
    if id(node) in active:
        raise _YamlProblem(node, "an alias refers to a node that contains it (a cycle)")
    if len(loc) > MAX_DEPTH:  # aliases can nest composed nodes deeper than the composer saw
        raise _YamlProblem(node, f"nested deeper than {MAX_DEPTH} levels (through aliases)")
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            # Integer keys are kept as their text (``vcpuPins: {0: 2}``); the model says where numbers fit.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in ("tag:yaml.org,2002:str",
                                                                                  "tag:yaml.org,2002:int"):
                raise _YamlProblem(key_node, "mapping keys must be plain strings")
            key = key_node.value
            if key in result:
                line, _ = marks.keys[(*loc, key)]
                raise _YamlProblem(key_node, f"duplicate key {key!r} (first defined on line {line})")
            marks.keys[(*loc, key)] = _pos(key_node)
            result[key] = _construct(value_node, (*loc, key), marks, active)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*loc, index), marks, active) for index, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    tag = node.tag
    if tag == "tag:yaml.org,2002:str":
        return node.value
    if tag == "tag:yaml.org,2002:int":
        return _yaml_int(node.value)
    if tag == "tag:yaml.org,2002:float":
        return _yaml_float(node.value)
    if tag == "tag:yaml.org,2002:bool":
        return node.value.lower() == "true"
    if tag == "tag:yaml.org,2002:null":
        return None
    raise _YamlProblem(node, f"unsupported YAML tag {tag!r}")


def format_loc(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str] | None:
    """The field names a model accepts at ``loc`` (for 'unknown field' hints), if it can be resolved."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(str(part))
        if info is None:
            return None
        current = _innermost_model(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _innermost_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _innermost_model(arg)
        if found is not None:
            return found
    return None


def _pydantic_errors(
    exc: ValidationError, model: type[BaseModel], file: str, marks: _Marks
) -> Iterator[ManifestError]:
    for err in exc.errors(include_url=False):
        loc: Loc = tuple(part for part in err["loc"] if isinstance(part, int | str))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            message = f"unknown field {loc[-1]!r}" + (
                f" (expected one of: {', '.join(allowed)})" if allowed else ""
            )
            line, col = marks.locate(loc, prefer_key=True)
        elif err["type"] == "missing":
            message = "required field is missing"
            line, col = marks.locate(loc)
        else:
            line, col = marks.locate(loc)
            if "input" in err and err["type"] != "value_error" and not isinstance(err["input"], dict | list):
                message += f" (got {err['input']!r})"
        yield ManifestError(file, line, col, format_loc(loc), message)


def _load_document(data: Any, file: str, marks: _Marks) -> tuple[BaseModel | None, list[ManifestError]]:
    if not isinstance(data, dict):
        line, col = marks.locate(())
        return None, [ManifestError(file, line, col, "", "a manifest must be a mapping with apiVersion and kind")]
    kind = data.get("kind")
    if kind not in KINDS:
        line, col = marks.locate(("kind",))
        what = "is missing" if kind is None else f"{kind!r} is not a known kind"
        return None, [ManifestError(file, line, col, "kind", f"{what}; expected one of: {', '.join(KINDS)}")]
    if data.get("apiVersion") != API_VERSION:
        line, col = marks.locate(("apiVersion",))
        return None, [
            ManifestError(file, line, col, "apiVersion", f"expected {API_VERSION!r}, got {data.get('apiVersion')!r}")
        ]
    model = KINDS[kind]
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, sorted(_pydantic_errors(exc, model, file, marks))


def is_hidden(relative: Path) -> bool:
    """A path (relative to the manifest directory) under or at a hidden name (``.git``, an editor's
    ``.swp``): never a manifest, for a full read and for the sync daemon's file watcher alike."""
    return any(part.startswith(".") for part in relative.parts)


def manifest_files(directory: Path) -> list[Path]:
    """YAML files under ``directory``, sorted, skipping hidden files and folders (``.git``...)."""
    found = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if is_hidden(relative):
            continue
        # Anything but a directory is listed: a dangling symlink, a FIFO or a device named *.yaml fails to
        # read (a located error), where skipping it would read as the removal of its VMs.
        if path.suffix in (".yaml", ".yml") and (path.is_symlink() or not path.is_dir()):
            found.append(path)
    return sorted(found)


def load_text(text: str, file: str) -> tuple[list[tuple[BaseModel, Source]], list[ManifestError]]:
    """Parse every document of one file's text."""
    objects: list[tuple[BaseModel, Source]] = []
    errors: list[ManifestError] = []
    try:
        for node in _documents(text):
            if node is None:
                continue
            marks = _Marks()
            try:
                data = _construct(node, (), marks)
            except _YamlProblem as problem:
                line, col = _pos(problem.node)
                errors.append(ManifestError(file, line, col, "", problem.message))
                continue
            obj, doc_errors = _load_document(data, file, marks)
            errors.extend(doc_errors)
            if obj is not None:
                objects.append((obj, Source(file, _pos(node)[0], marks)))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        errors.append(ManifestError(file, line, col, "", f"invalid YAML: {exc.problem or exc.context}"))
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML parse error is marked
        errors.append(ManifestError(file, 1, 1, "", f"invalid YAML: {exc}"))
    except RecursionError:  # pragma: no cover - the depth caps above come first; never crash the other files
        errors.append(ManifestError(file, 1, 1, "", f"nested too deeply (over {MAX_DEPTH} levels)"))
    return objects, errors


@functools.lru_cache(maxsize=4096)
def _parsed(text: str, file: str) -> tuple[tuple[tuple[BaseModel, Source], ...], tuple[ManifestError, ...]]:
    """``load_text``, remembered by the file's name and text: the sync daemon reloads the directory on
    every edit, and an apply reads it before and after, but only files whose text changed are parsed and
    validated again (parsing is the costly part; reading a file is not). Pure: same text, same result,
    and the models are frozen."""
    objects, errors = load_text(text, file)
    return tuple(objects), tuple(errors)


def read_file(path: Path, root: Path) -> str | ManifestError:
    """The text of one manifest file under ``root``, or the located error that refused it."""
    try:
        return read_manifest(path, root)
    except ManifestUnreadable as exc:
        return ManifestError(str(path), exc.line, exc.col, "", exc.message)


def assemble(directory: str | Path, texts: Mapping[str, str | ManifestError]) -> ManifestSet:
    """Parse (``_parsed``: only texts not seen before) and cross-check the files ``texts`` holds (file ->
    its text, or the error reading it), in file order. ``load_directory`` is this over every file; the
    sync daemon keeps ``texts`` and re-reads only the files an event names, so the duplicate-name and
    cross-file checks still run over the whole set each time (they are cheap; parsing is not)."""
    result = ManifestSet(directory=str(directory))
    for file in sorted(texts, key=Path):  # as manifest_files orders them
        text = texts[file]
        result.files.append(file)
        if isinstance(text, ManifestError):
            result.errors.append(text)
            result.failed_files.add(file)
            continue
        objects, errors = _parsed(text, file)
        if errors:
            result.errors.extend(errors)
            result.failed_files.add(file)
        for obj, source in objects:
            if isinstance(obj, VirtualMachine):
                _add_vm(result, obj, source)
            elif isinstance(obj, Network):
                _add_network(result, obj, source)
    _check_unique_across(result)
    return result


def load_directory(directory: str | Path) -> ManifestSet:
    """Load and cross-check every manifest under ``directory``."""
    root = Path(directory)
    if not root.is_dir():
        result = ManifestSet(directory=str(root))
        result.errors.append(ManifestError(str(root), 1, 1, "", "not a directory"))
        return result
    return assemble(root, {str(path): read_file(path, root) for path in manifest_files(root)})


def _clash(result: ManifestSet, here: Source, there: Source, path: Loc, message: str, other: str,
           there_path: Loc | None = None) -> None:
    """A conflict between two documents is an error in both: neither is acted on (the sync daemon keeps
    both files' last good state) rather than whichever happens to be read first."""
    _error(result, here, path, f"{message} at {there.file}:{there.line}")
    _error(result, there, there_path or path, f"{other} at {here.file}:{here.line}")


def _add_vm(result: ManifestSet, vm: VirtualMachine, source: Source) -> None:
    first = result.vms.get(vm.name)
    if first is not None:
        what = f"VirtualMachine {vm.name!r} is also defined"
        _clash(result, source, first.source, ("metadata", "name"), what, what)
        return
    result.vms[vm.name] = LoadedVM(vm, source)


def _add_network(result: ManifestSet, network: Network, source: Source) -> None:
    first = result.networks.get(network.name)
    if first is not None:
        what = f"Network {network.name!r} is also defined"
        _clash(result, source, first.source, ("metadata", "name"), what, what)
        return
    clash = next((n for n in result.networks.values() if n.network.spec.bridge == network.spec.bridge), None)
    if clash is not None:
        _clash(result, source, clash.source, ("spec", "bridge"),
               f"bridge {network.spec.bridge!r} is also used by Network {clash.network.name!r}",
               f"bridge {network.spec.bridge!r} is also used by Network {network.name!r}")
        return
    result.networks[network.name] = LoadedNetwork(network, source)


def _error(result: ManifestSet, source: Source, path: Loc, message: str) -> None:
    line, col = source.at(*path)
    result.errors.append(ManifestError(source.file, line, col, format_loc(path), message))
    result.failed_files.add(source.file)


def _check_unique_across(result: ManifestSet) -> None:
    """MACs and host port forwards must be unique across all VMs of the host; a NIC's Network must exist."""
    macs: dict[str, tuple[Source, str, Loc]] = {}
    ports: dict[tuple[str, str, int], tuple[Source, str, Loc]] = {}
    for name, loaded in sorted(result.vms.items()):
        spec = loaded.vm.spec
        for index, nic in enumerate(spec.networks):
            mac = nic.mac  # derived ones never clash: spec.macs resolves them, deterministically
            where: Loc = ("spec", "networks", index)
            this = f"VirtualMachine {name!r} NIC {nic.name!r}"
            if nic.network is not None and nic.network not in result.networks:
                known = ", ".join(sorted(result.networks)) or "none"
                _error(result, loaded.source, (*where, "network"),
                       f"no Network named {nic.network!r} (defined: {known})")
            if mac is not None and mac in macs:
                first, other, first_at = macs[mac]
                _clash(result, loaded.source, first, (*where, "mac"), f"MAC {mac} is also used by {other}",
                       f"MAC {mac} is also used by {this}", first_at)
            if mac is not None:
                macs.setdefault(mac, (loaded.source, this, (*where, "mac")))
            for number, forward in enumerate(nic.portForwards):
                key = (forward.hostAddress, forward.protocol, forward.host)
                at: Loc = (*where, "portForwards", number, "host")
                port = f"host port {forward.protocol}/{forward.hostAddress}:{forward.host}"
                if key in ports:
                    first, other, first_at = ports[key]
                    _clash(result, loaded.source, first, at, f"{port} is also forwarded by {other}",
                           f"{port} is also forwarded by {this}", first_at)
                ports.setdefault(key, (loaded.source, this, at))


def load_host_config_text(text: str, file: str) -> tuple[HostConfig | None, list[ManifestError]]:
    """Parse a host configuration file's text, as strictly as a manifest (every error located)."""
    try:
        node = _document(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return None, [ManifestError(file, line, col, "", f"invalid YAML: {exc.problem or exc.context}")]
    if node is None:
        return HostConfig(), []
    marks = _Marks()
    try:
        data = _construct(node, (), marks)
    except _YamlProblem as problem:
        line, col = _pos(problem.node)
        return None, [ManifestError(file, line, col, "", problem.message)]
    if not isinstance(data, dict):
        return None, [ManifestError(file, 1, 1, "", "the host configuration must be a mapping")]
    try:
        return HostConfig.model_validate(data), []
    except ValidationError as exc:
        return None, sorted(_pydantic_errors(exc, HostConfig, file, marks))


def load_host_config(explicit: str | None = None) -> HostConfig:
    """The host's configuration: ``explicit`` (``--config``), else ``$INFINIZATION_CONFIG``, else
    /etc/infinization/config.yaml if it exists, else the defaults.

    :raise ConfigInvalid: When the file cannot be read or fails validation (every error, located).
    """
    chosen = explicit or os.environ.get(CONFIG_ENV)
    path = Path(chosen or DEFAULT_CONFIG)
    if not chosen and not path.exists():
        return HostConfig()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigInvalid(f"cannot read the host configuration {path}: {exc}") from exc
    config, errors = load_host_config_text(text, str(path))
    if config is None:
        raise ConfigInvalid("; ".join(str(error) for error in errors) + "; fix the host configuration")
    return config

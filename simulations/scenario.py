"""Scenario files: a study described in TOML, turned into the flat Settings Flower carries.

```toml
[federation]
sites = ["federation/site-0", "federation/site-1"]   # relative to this file's folder
[model]
init = "pretrained.pt"    # optional; relative to this file's folder too
[train]
rounds = 3
```
Every other key is one of fedir.config.Settings (section and key as in pyproject's
`[tool.flwr.app.config]`, e.g. `[model] image-size = 128`). `--set section.key=value`
overrides a key from the command line; the value is parsed as TOML (so `3`, `0.5`,
`"text"` and bare words all work).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedir.client.inputs import check_manifest, masked_rows
from fedir.client.manifest import MANIFEST_NAME, manifest_columns
from fedir.client.tabular import CLINICAL_PREFIX
from fedir.config import FUSED_INPUTS, SITE_SEPARATOR, Settings, SettingsError
from fedir.errors import UserError


class ScenarioError(UserError, ValueError):
    """The scenario file cannot be used; the message says why in one line."""


def _flatten(doc: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ScenarioError(f"{source}: top-level key {section!r} must be a [section]")
        for key, value in table.items():
            flat[f"{section}.{key.replace('_', '-')}"] = value
    return flat


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ScenarioError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word, e.g. --set train.objective=supervised
    return key.strip().replace("_", "-"), value


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Settings:
    """Read a scenario TOML, apply overrides, check the settings (fedir.config), resolve the
    site folders and read their manifests: a ScenarioError (a setting's error prefixed with
    the file) or a ManifestError, both fedir.errors.UserError, names what is wrong before
    any run starts."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc})") from None
    flat = _flatten(doc, str(path))
    flat.update(dict(_parse_override(item) for item in overrides))
    sites = flat.get("federation.sites")
    if isinstance(sites, str):
        sites = [s for s in sites.split(SITE_SEPARATOR) if s]
    if not isinstance(sites, list) or not sites:
        raise ScenarioError(f"{path}: [federation] sites must list at least one site folder")
    flat["federation.sites"] = SITE_SEPARATOR.join(str(p) for p in _resolve_sites(sites, path.parent))
    init = flat.get("model.init")
    if isinstance(init, str) and init:  # a checkpoint, like the sites, relative to this file
        checkpoint = (path.parent / init).resolve()
        if not checkpoint.is_file():  # read and matched by the coordinator (fedir.server.model_init)
            raise ScenarioError(f"{path}: model.init = {init!r} ({checkpoint}): no such file")
        flat["model.init"] = str(checkpoint)
    try:
        settings = Settings.from_run_config(flat)
    except SettingsError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    for site in settings.sites:  # each site's manifest error now, not after Flower starts
        check_manifest(site, settings.data_inputs, settings.task_kind, settings.task_classes)
    if settings.data_inputs == FUSED_INPUTS:  # the coordinator refuses it too (fedir.server.feature_stats)
        columns = {Path(site).name: [c for c in manifest_columns(site) if c.startswith(CLINICAL_PREFIX)]
                   for site in settings.sites}
        if len({tuple(c) for c in columns.values()}) > 1:
            raise ScenarioError(f"{path}: data.inputs = {FUSED_INPUTS!r} needs the same clin_* columns at every site; "
                                + "; ".join(f"{site}: {', '.join(c)}" for site, c in columns.items()))
    if settings.task_kind == "segmentation" and not any(masked_rows(site) for site in settings.sites):
        raise ScenarioError(f"{path}: task.kind = \"segmentation\" needs masks, and no site's manifest names one "
                            "(a `mask` column; `fedir data synth --masks` writes them)")
    return settings


def _resolve_sites(sites: list[Any], base: Path) -> list[Path]:
    resolved = []
    for entry in sites:
        site = (base / str(entry)).resolve()
        if not (site / MANIFEST_NAME).is_file():
            raise ScenarioError(f"site {entry!r} ({site}): no {MANIFEST_NAME} there")
        resolved.append(site)
    names = [s.name for s in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ScenarioError(f"site folder names must be unique (a site's name is its folder's name): {duplicates}")
    return resolved

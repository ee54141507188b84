"""docs/configuration.md, generated from the settings' fields: every variable, its default and meaning.

    python -m pipeline.settings_doc > docs/configuration.md

A test fails when the page and :class:`pipeline.settings.Settings` differ.
"""

from __future__ import annotations

from pipeline.settings import Settings, env_name


def configuration_table() -> str:
    """docs/configuration.md: every setting, its variable, default and meaning."""
    lines = ["# Configuration", "",
             "Every setting is an environment variable, the same name in all three runtimes (the "
             "simulator, compose.yaml, the chart's ConfigMap). Flags of `python -m pipeline` override "
             "the common ones (`--help`).", "",
             "Generated from `pipeline/settings.py` by `python -m pipeline.settings_doc > "
             "docs/configuration.md`; a test fails when this page and the code differ.", "",
             "| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = "unset" if info.default is None else f"`{info.default}`"
        lines.append(f"| `{env_name(name)}` | {default} | {info.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(configuration_table(), end="")

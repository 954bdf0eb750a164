"""YAML read as YAML 1.2 reads numbers: PyYAML follows YAML 1.1, which wants a dot in a
float, so that `1e-4` would be read as the string '1e-4'. Search spaces and config files use it."""

from __future__ import annotations

import re

# YAML 1.2's floats (its core schema).
YAML12_FLOAT = r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"""


def yaml_loader():
    """PyYAML's safe loader, reading numbers as YAML 1.2 does (`1e-4` is a float)."""
    import yaml

    class Yaml12Loader(yaml.SafeLoader):
        pass

    Yaml12Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(YAML12_FLOAT), list("-+0123456789.")
    )
    return Yaml12Loader

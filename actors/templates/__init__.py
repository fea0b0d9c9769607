"""Workflow templates: ComfyUI graphs with typed parameters and a cost rule, loaded from a directory of JSON files.

Pure (no trio, no I/O beyond reading the files): ``load_directory`` gives an immutable ``Catalog``;
``Template.resolve`` turns submitted parameters into a graph, the resolved parameters and a price.
``raw_policy`` holds the rules for raw (non-template) workflows: who may send one, which node classes it may use.
"""

from ._catalog import (
    BUNDLED_DIR,
    Catalog,
    LoadError,
    ParamError,
    Resolved,
    Template,
    TemplateError,
    check_graph,
    load_directory,
    load_file,
)
from ._cost import MAX_COST, CostError, CostRule
from ._params import (
    DEFAULT_MAX_LENGTH,
    MAX_SAFE_INTEGER,
    PARAM_TYPES,
    SEED,
    Binding,
    Param,
    ParamSpecError,
)

__all__ = [
    "BUNDLED_DIR",
    "DEFAULT_MAX_LENGTH",
    "MAX_COST",
    "MAX_SAFE_INTEGER",
    "PARAM_TYPES",
    "SEED",
    "Binding",
    "Catalog",
    "CostError",
    "CostRule",
    "LoadError",
    "Param",
    "ParamError",
    "ParamSpecError",
    "Resolved",
    "Template",
    "TemplateError",
    "check_graph",
    "load_directory",
    "load_file",
]

#!/usr/bin/env python3
"""The ComfyUI simulator's entry point and import name; the code is the ``comfysim`` package beside this file.

``python scripts/fake_comfyui.py --port P [--host H] [--step-ms MS] [--fail-rate F] [--seed S] [--no-previews]
[--cache]`` prints ``fake ComfyUI listening on http://HOST:PORT`` once listening and runs until SIGINT/SIGTERM.
``from fake_comfyui import FakeComfyUI`` (with ``scripts/`` on the path, or this file loaded by its path, as
``comfy-gateway serve --simulate`` does) gives the simulator for tests. It imports nothing from the gateway.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in {str(Path(p).resolve()) for p in sys.path if p}:
    sys.path.append(str(Path(__file__).resolve().parent))  # loaded by path: make ``comfysim`` importable

from comfysim import *  # noqa: F403
from comfysim import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

"""Sub-commands contributed by feature modules (evaluation, reports, demo).

Each registrar takes argparse's sub-parser collection and adds its commands; ``cli.py`` stays thin.
"""

from __future__ import annotations

REGISTRARS: list = []
REGISTRARS.append(__import__("anchorkd.eval.cli", fromlist=["register"]).register)

"""`fedmef flower app RECIPE -o DIR`: a Flower app directory for `flwr run`.

DIR/
  pyproject.toml              the Flower app: components, run config (recipe, run-dir, min-nodes)
  recipe.yaml                 the resolved recipe (fl.engine: flower)
  fedmef_flower_app/          thin ServerApp / ClientApp modules importing fedmef_toolkit.flower
  flwr_home/config.toml       SuperLink connections (Flower >= 1.2x keeps them here, not in
                              pyproject): fedmef-sim (simulation), fedmef-local (localhost
                              deployment, insecure), fedmef-remote (TLS); FLWR_HOME=DIR/flwr_home
  .gitignore                  keeps flwr_home/ and runs/ out of the app bundle (FAB)
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from ..recipe import recipe_to_yaml
from ..storage import write_text_atomic
from . import FLOWER_RANGE

SERVER = '''"""ServerApp of this Flower app: fedmef_toolkit's Simulator drives the recipe's strategy."""
from pathlib import Path

from fedmef_toolkit.flower.server_app import make_server_app

app = make_server_app(Path(__file__).resolve().parents[1])
'''

CLIENT = '''"""ClientApp of this Flower app: trains the client each message names (fedmef_toolkit.flower)."""
from fedmef_toolkit.flower.client_app import app as _client_app

app = _client_app
'''


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(recipe, out: Path, superlink: str = "127.0.0.1:9093", root_cert: str | None = None,
              min_nodes: int = 2) -> Path:
    from .. import __version__

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError("the app directory exists and is not empty; choose a new one", str(out))
    name = re.sub(r"[^a-z0-9-]", "-", recipe.name.lower()).strip("-") or "fedmef"
    (out / "fedmef_flower_app").mkdir(parents=True, exist_ok=True)
    (out / "flwr_home").mkdir(exist_ok=True)
    run_dir = (out / "runs" / recipe.name).resolve()
    sim_nodes = recipe.fl.flower.supernodes or recipe.data.num_clients
    f = recipe.fl.flower
    pyproject = f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedmef-{name}"
version = "1.0.0"
description = "fedmef-toolkit recipe '{recipe.name}' ({recipe.method.name}) as a Flower app"
license = "Apache-2.0"
dependencies = ["fedmef-toolkit[flower]", "flwr{FLOWER_RANGE}"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedmef"

[tool.flwr.app.components]
serverapp = "fedmef_flower_app.server_app:app"
clientapp = "fedmef_flower_app.client_app:app"

[tool.flwr.app.config]
# recipe: relative to this directory (or a bundled recipe name); run-dir: on the SuperLink's machine,
# an existing run directory is resumed; min-nodes: SuperNodes to wait for before round 1.
recipe = "recipe.yaml"
run-dir = {_toml_str(str(run_dir))}
min-nodes = {min_nodes}
wait-s = 300

# SuperLink connections (simulation and deployment) are in flwr_home/config.toml:
#   export FLWR_HOME={_toml_str(str((out / "flwr_home").resolve()))}
#   flwr run . fedmef-sim      # Flower's simulation engine, {sim_nodes} virtual SuperNodes
#   flwr run . fedmef-local    # SuperLink + SuperNodes on this host (insecure: localhost only)
#   flwr run . fedmef-remote   # a SuperLink on another machine, over TLS
'''
    cert = root_cert or "certificates/ca.crt"
    connections = f'''# Flower SuperLink connections for this app (use with FLWR_HOME pointing at this directory).
[superlink]
default = "fedmef-sim"

# Flower's simulation engine: one virtual SuperNode per client (each owns its partition).
[superlink.fedmef-sim]
address = ":local:"
options.num-supernodes = {sim_nodes}
options.backend.client-resources.num-cpus = {f.client_cpus}
options.backend.client-resources.num-gpus = {f.client_gpus}

# A SuperLink on this host with SuperNodes started by hand (docs/flower.md).
# Insecure (no TLS) is only for 127.0.0.1: never expose these ports.
[superlink.fedmef-local]
address = "127.0.0.1:9093"
insecure = true

# A SuperLink on another machine, TLS with your CA's certificate.
[superlink.fedmef-remote]
address = {_toml_str(superlink)}
root-certificates = {_toml_str(cert)}
'''
    write_text_atomic(out / "pyproject.toml", pyproject)
    write_text_atomic(out / "recipe.yaml", recipe_to_yaml(recipe))
    write_text_atomic(out / "fedmef_flower_app" / "__init__.py", "")
    write_text_atomic(out / "fedmef_flower_app" / "server_app.py", SERVER)
    write_text_atomic(out / "fedmef_flower_app" / "client_app.py", CLIENT)
    write_text_atomic(out / "flwr_home" / "config.toml", connections)
    write_text_atomic(out / ".gitignore", "flwr_home/\nruns/\ncertificates/\n")
    return out

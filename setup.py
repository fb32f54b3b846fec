"""Maps the repository's top-level folders into the ``pyllumnix`` import namespace.

``control_plane/x.py`` installs as ``pyllumnix.control_plane.x`` (likewise infra, data_plane, clients, tools,
protos). The package list is computed, so a new sub-package needs no edit here.
"""

from setuptools import find_namespace_packages, setup

FOLDERS = ("infra", "control_plane", "data_plane", "clients", "tools", "protos")

# "pyllumnix" itself is a namespace package: it has no folder (a folder of that name in the checkout would shadow the
# installed mapping whenever the repository root is on sys.path).
packages: list[str] = []
package_dir: dict[str, str] = {}
for folder in FOLDERS:
    packages.append(f"pyllumnix.{folder}")
    package_dir[f"pyllumnix.{folder}"] = folder
    # clients/node is the Node.js client (node_modules, dist): not Python.
    for sub in find_namespace_packages(where=folder, exclude=["*__pycache__*", "*.egg-info*", "node", "node.*"]):
        packages.append(f"pyllumnix.{folder}.{sub}")

setup(packages=packages, package_dir=package_dir)

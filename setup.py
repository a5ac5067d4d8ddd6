"""Map the top-level code folders onto one import package, ``asbuilt``.

The repository keeps ``agent/``, ``probes/`` and ``exporters/`` at the top level (the design card's
layout); installed, they are ``asbuilt.agent``, ``asbuilt.probes`` and ``asbuilt.exporters`` so that
nothing generic lands at the top of site-packages.
"""
from setuptools import find_packages, setup

FOLDERS = ("agent", "probes", "exporters")
packages, package_dir = [], {}
for folder in FOLDERS:
    package_dir["asbuilt." + folder] = folder
    for sub in [folder] + [folder + "." + p for p in find_packages(folder)]:
        packages.append("asbuilt." + sub)

setup(packages=packages, package_dir=package_dir)

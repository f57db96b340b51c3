"""nbval runs every chapter. Chapter 9 needs Triton, which has wheels for Linux only
(requirements.txt installs it there): on other systems that chapter is not collected."""

from importlib.util import find_spec

collect_ignore = [] if find_spec("triton") else ["09_kernels.ipynb"]

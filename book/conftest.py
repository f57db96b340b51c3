"""nbval runs every chapter. Chapters 9 and 10 need Triton, which has wheels for Linux only
(requirements.txt installs it there): on other systems those chapters are not collected."""

from importlib.util import find_spec

collect_ignore = (
    [] if find_spec("triton") else ["09_kernels.ipynb", "10_decoding.ipynb"]
)

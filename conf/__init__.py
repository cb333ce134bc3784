"""The Hydra config tree. It lives at the repository's top level (`conf/`) and is installed as the
package `bdexp.conf` (pyproject.toml maps the folder), so `pip install .` ships it."""

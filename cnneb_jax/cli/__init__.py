"""The command-line programs: `cnneb-train`, `cnneb-evaluate` and `cnneb-export` once the
package is installed (pyproject.toml's [project.scripts]), or `python train.py`,
`python evaluate.py` and `python export.py` from a checkout. Each parses its flags and calls
the library."""

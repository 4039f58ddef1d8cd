"""`python -m depthvlm_jax.aot`: see the package docstring, or `--help`."""

import os
import sys

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host traces on the CPU; libtpu only compiles
  from absl import app, flags

  from depthvlm_jax import aot
  from depthvlm_jax.aot import cli
  from depthvlm_jax.aot.chips import _quiet_libtpu
  _quiet_libtpu()
  __doc__ = aot.__doc__  # what absl's --help prints above the flags
  cli.define_flags()
  flags.adopt_module_key_flags(cli)  # --help lists the main module's flags: these
  app.run(lambda argv: sys.exit(cli.main(argv)))

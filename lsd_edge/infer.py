"""`lsd_edge.infer.load_runner`, as scripts written for earlier versions import it.

The runners live in `lsd_edge.runtime`; this module only names them, and stays torch-free.
"""

from lsd_edge.runtime.runner import Runner, load_runner

__all__ = ["Runner", "load_runner"]

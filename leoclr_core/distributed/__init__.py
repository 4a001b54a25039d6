"""The Ray layer: Ray Train workers, Ray Data streaming, Ray on the command line.

Imports Ray; the method layer (everything outside this package and `tracking`) never does.
"""

import os

# Read by Ray when it is imported: local clusters use token auth (Ray 2.60's default), and the
# clients of a token-auth cluster must say so too.
os.environ.setdefault("RAY_AUTH_MODE", "token")

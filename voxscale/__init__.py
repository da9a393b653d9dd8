"""voxscale: autoscale GPU text-to-speech inference on Kubernetes.

Import map (folder -> module):
  voxscale/      -> voxscale            (CLI, local control plane tooling, shared contracts)
  operator/      -> voxscale.operator   (the kopf operator and its scaling engine)
  inference/     -> voxscale.inference  (the FastAPI TTS server)
  crds/          -> voxscale.crds       (the CRD files, read as package data)
"""

from pkgutil import extend_path

# Run from the repository root, this folder is found first; the installed tree (which maps
# operator/ and inference/ into the package) must still be searched for the subpackages.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"

"""The package's anomalib models (and the offline peers), aliased into ``anomalib.models`` on import.

``anomalib.models.get_model("radar")`` (or ``"glad"``, ``"dadda"``) and ``anomalib benchmark`` look models up among the
direct subclasses of ``AnomalibModule`` and the attributes of ``anomalib.models``; importing
this module makes both see the classes below (see :mod:`anomalib_diffusion._import_hook`).
"""

import warnings
from importlib import import_module

from anomalib_diffusion.components.offline_backbones import register_offline_backbones

from .dadda import DADDA
from .glad import GLAD
from .peers import DraemOffline, PadimLite0, PatchcoreLite0
from .radar import RADAR

__all__ = ["DADDA", "GLAD", "RADAR", "DraemOffline", "PadimLite0", "PatchcoreLite0"]

# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, at every batch it moves: one warning per run
# that names Lightning's internals and that no user can act on. Only that message is silenced.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

# timm learns the offline tag tf_efficientnet_lite0.wheel_in1k (when its weight wheel is installed),
# so anomalib's own models can name it as their backbone.
register_offline_backbones()

# import_module, not `import anomalib.models`: when the import hook runs this, anomalib.models
# has executed but is not yet bound as an attribute of the anomalib package.
_anomalib_models = import_module("anomalib.models")
for _name in __all__:
    setattr(_anomalib_models, _name, globals()[_name])

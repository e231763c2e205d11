"""Deploy anywhere: export nested sizes as standalone artifacts, recommend, stream, funnel (issue 12).

Serving (``Recommender``, ``streaming``, ``funnel``) runs the plain-torch network of
``recbole_fmrl.model.network`` and needs only torch; ``export_sizes``
reads a training checkpoint (and the frozen feature files it names), never RecBole.
"""
from recbole_fmrl.deploy.export import export_sizes
from recbole_fmrl.deploy.recommender import Recommender, UnknownItemError

__all__ = ["export_sizes", "Recommender", "UnknownItemError"]

"""The bundled workflows, one module per paper over the shared builder (:mod:`.builder`)."""

from . import imagic, layerdiffusion, rectifier, sinddm, sine

GRAPHS = [*sinddm.GRAPHS, *imagic.GRAPHS, *sine.GRAPHS, *layerdiffusion.GRAPHS, *rectifier.GRAPHS]

"""The models composed from the blocks: pi0 / pi0.5 (:mod:`.pi0`), ACoT-VLA (:mod:`.acot`), HALO (:mod:`.halo`) and
the plain MoT language model (:mod:`.mot_lm`); each registers its config as a ``model`` component."""

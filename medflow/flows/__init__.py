"""Invertible 3D building blocks and the multi-scale Glow."""

from medflow.flows.actnorm import ActNorm
from medflow.flows.base import InvertibleModule
from medflow.flows.coupling import AffineCoupling
from medflow.flows.covariate_scale import CovariateScale
from medflow.flows.glow import Encoding, FlowStep, Glow3d, GlowLevel
from medflow.flows.injector import ConditionalAffine
from medflow.flows.invconv import InvConv1x1x1
from medflow.flows.prior import GaussianPrior
from medflow.flows.squeeze import HaarDownsample3d, Squeeze3d

__all__ = [
    "ActNorm", "AffineCoupling", "ConditionalAffine", "CovariateScale", "Encoding", "FlowStep", "GaussianPrior",
    "Glow3d", "GlowLevel", "HaarDownsample3d", "InvConv1x1x1", "InvertibleModule", "Squeeze3d",
]

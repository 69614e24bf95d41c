"""The procedural shape world's object families, by category (see docs/shape_world.md)."""
from __future__ import annotations

from rl3d.stages.shapes.base import Canvas, Family
from rl3d.stages.shapes.mechanical import Cart, Chair, Mug, Table
from rl3d.stages.shapes.organic import Cactus, Mushroom, Snowman, Tree
from rl3d.stages.shapes.physical import BalancedStack, Lamp
from rl3d.stages.shapes.rare import Rocket
from rl3d.stages.shapes.structural import Bridge, Shelf, Stack, Stairs, Tower
from rl3d.stages.shapes.stylized import HollowShell, Wireframe

CATEGORIES = ("spatial_structural", "mechanical_affordance", "physical_plausibility", "organic_forms",
              "rare_entities", "stylized_abstract")

FAMILY_CLASSES = (Tower, Stairs, Stack, Shelf, Bridge, Table, Chair, Mug, Cart, Lamp, BalancedStack,
                  Tree, Cactus, Snowman, Mushroom, Wireframe, HollowShell, Rocket)
FAMILIES: dict[str, Family] = {cls.name: cls() for cls in FAMILY_CLASSES}

__all__ = ["CATEGORIES", "FAMILIES", "Canvas", "Family"]

"""Headless, deterministic multi-view rendering of flat-coloured triangle meshes by ray casting.

One mesh flows forward through four small modules:
- cameras.py: view angles, camera frames, one pinhole ray per pixel, the two framings (glTF
  frame: +Y up, +Z front);
- engines.py: the interface every ray engine meets (rays -> Hits) and the choice between them:
  open3d_engine.py (open3d's Embree scene, CPU) and torch_engine.py (Moller-Trumbore in
  PyTorch, any device);
- shading.py: lighting and colours, a per-view look-up table of shaded face colours gathered by
  the hit triangle id;
- renderer.py: render_views(mesh, ...) ties them together; images.py encodes the arrays as PNGs
  (views, depth, normals, the captioned contact sheet).
The `rl3d render` command (stages/render.py) reads the samples table and writes through the
stage contract. Importing the library never imports open3d (open3d_engine imports it when
used) nor torch (renderer imports torch_engine only for the torch backend).
"""

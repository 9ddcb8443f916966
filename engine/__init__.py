"""Training machinery shared by the jobs: configs and recipes, the per-worker training loop, checkpoints,
COCO evaluation, visualisation. May import model/, pipeline/, cluster/ and Ray; they never import it."""

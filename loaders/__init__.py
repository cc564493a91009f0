"""Files → objects: model folders, checkpoint key mapping, safe loading."""

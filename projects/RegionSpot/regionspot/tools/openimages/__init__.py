"""The parts of ``regionspot-convert-openimages`` (:mod:`regionspot.tools.convert_openimages`, the
command): reading the CSV files (:mod:`.csv_files`), the annotations (:mod:`.annotations`), the
images and their sizes (:mod:`.images`), and the streamed COCO json (:mod:`.coco_json`)."""

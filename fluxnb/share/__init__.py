"""Notebook 05: the model card and the upload (a dry run unless asked otherwise). See fluxnb.share.hub."""

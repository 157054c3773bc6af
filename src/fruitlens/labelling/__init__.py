"""A few labelled photos of the user's own setting: which to label (``select``), the labels read back (``labels``),
the labelling page (``page``) and the service's store of corrected answers (``feedback``)."""

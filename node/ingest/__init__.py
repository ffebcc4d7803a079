"""Step 1 of the data's way: DICOM files -> series -> a volume with its patient geometry.

``series`` finds and groups the CT and MR series in any mix of files and folders;
``volume`` decodes one series into a voxel array with its exact affine (every storage
variant: tilted, multi-frame, compressed, mixed sizes).
"""

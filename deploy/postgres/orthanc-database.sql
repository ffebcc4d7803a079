-- compose.cluster.yaml: Orthanc's shared index lives in its own database beside the queue's (pacs)
CREATE DATABASE orthanc OWNER pacs;

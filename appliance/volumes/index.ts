/** Volume adapters (image files, block devices) and the changed-blocks file format. */
export { openVolumeReader, openVolumeWriter, inspectVolume, loopBackingFile } from './file.js';
export type { Hole, LocalVolumeReader, LocalVolumeWriter, OpenWriterOptions, VolumeInfo, VolumeKind } from './file.js';
export { parseChangedBlocks, readChangedBlocksFile } from './changed-blocks.js';

#!/usr/bin/env bash
# Install the OHIF viewer (prebuilt static app from the npm package @ohif/app, pinned) under
# orthanc/ohif-dist/, served by sci-node's Orthanc plugin under /ohif/. Idempotent.
#
#   * fetches the one package tarball with the npm client (`npm pack`, into a cache folder) and checks
#     it against the pinned sha512: the package ships its prebuilt dist/, so none of its ~40 build
#     dependencies are needed (`npm install` would pull them all; the app is never built here).
#     Version 3.13.2 is pinned: newer releases need a newer Node than Debian 12's v20 (`npm` only
#     downloads here, it runs no package code: --ignore-scripts).
#   * copies dist/ to orthanc/ohif-dist/ and moves its public path from / to /ohif/
#     (index.html, window.PUBLIC_URL, webpack's __webpack_require__.p, manifest.json),
#   * writes app-config.js: routerBasename /ohif, one DICOMweb data source on the same origin
#     (/dicom-web for QIDO-RS, WADO-RS and STOW-RS, /wado for WADO-URI: the orthanc-dicomweb plugin),
#     segmentation editing on in the viewer modes (OHIF's own customizations/segmentation/
#     segmentationEditing.jsonc, loaded through customizationService.requires) and storing to the
#     data source on (supportsStow: a corrected SEG goes back to Orthanc, docs/corrections.md), and
#     the lines OHIF's SR view writes beside each finding of the node's own reports (sciNodeSrLines:
#     every value with its name, docs/orthanc.md "The report in OHIF").
#
# Environment: SCI_NODE_CACHE (default ~/.cache/sci-node), OHIF_FORCE=1 to reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OHIF_VERSION=3.13.2
OHIF_SHA512="WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
PATCH_LEVEL=7                       # bump when the patching below changes
DEST="$ROOT/orthanc/ohif-dist"
STAMP="$DEST/.sci-node-ohif"
WANT="@ohif/app@$OHIF_VERSION patch $PATCH_LEVEL"
CACHE="${SCI_NODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sci-node}/ohif"
TGZ="$CACHE/ohif-app-$OHIF_VERSION.tgz"

if [ "${OHIF_FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "==> OHIF $OHIF_VERSION already installed in orthanc/ohif-dist/"
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "install_ohif.sh: npm not found (apt-get install npm)" >&2; exit 1; }

sha512_of() {
  python3 -c 'import base64, hashlib, sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$1"
}
mkdir -p "$CACHE"
if [ ! -f "$TGZ" ] || [ "$(sha512_of "$TGZ")" != "$OHIF_SHA512" ]; then
  echo "==> npm pack @ohif/app@$OHIF_VERSION (50 MB) into $CACHE"
  rm -f "$TGZ"
  (cd "$CACHE" && npm pack --silent --ignore-scripts "@ohif/app@$OHIF_VERSION" >/dev/null)
fi
if [ "$(sha512_of "$TGZ")" != "$OHIF_SHA512" ]; then
  echo "install_ohif.sh: $TGZ does not match the pinned sha512 of @ohif/app@$OHIF_VERSION" >&2
  exit 1
fi

echo "==> unpacking OHIF dist/ into orthanc/ohif-dist/ and moving its public path to /ohif/"
WORK=$(mktemp -d "$ROOT/orthanc/.ohif-tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
tar -xzf "$TGZ" -C "$WORK" package/dist
NEW="$WORK/package/dist"

# index.html: every absolute asset URL and PUBLIC_URL.
sed -i -e 's#\(href\|src\)="/#\1="/ohif/#g' -e 's#content="/assets/#content="/ohif/assets/#g' -e 's#window.PUBLIC_URL="/"#window.PUBLIC_URL="/ohif/"#g' "$NEW/index.html"
grep -q 'window.PUBLIC_URL="/ohif/"' "$NEW/index.html" || { echo "install_ohif.sh: index.html patch failed" >&2; exit 1; }
# webpack's runtime public path in the app bundle and its workers (chunks, wasm, workers load from it).
grep -l '__webpack_require__.p = "/";' "$NEW"/*.js | xargs -r sed -i 's#__webpack_require__.p = "/";#__webpack_require__.p = "/ohif/";#'
if grep -q '__webpack_require__.p = "/";' "$NEW"/*.js; then
  echo "install_ohif.sh: bundle public path patch failed" >&2; exit 1
fi
# stylesheets: absolute url(/...) of fonts and images.
sed -i 's#url(/\([^/]\)#url(/ohif/\1#g' "$NEW"/*.css
[ -f "$NEW/manifest.json" ] && sed -i -e 's#"/assets/#"/ohif/assets/#g' -e 's#"start_url": *"/"#"start_url": "/ohif/"#' "$NEW/manifest.json"

cat > "$NEW/app-config.js" <<'EOF'
/** sci-node: OHIF served by Orthanc under /ohif/, data from Orthanc's DICOMweb on the same origin. */
/**
 * sci-node: the lines OHIF's SR view writes beside one finding of a sci-node report.
 *
 * OHIF 3.13 shows at most 5 "label: value" lines per finding, drops the derivation of a value
 * (mean, minimum ...), shows "Length" without its name and a 0 as nothing. For a report whose
 * Manufacturer is sci-node the lines are rebuilt from the report: the finding ("Lesion 1 of 2")
 * and its vertebral level (a finding site other than the spinal cord), then one line per quantity,
 * its derivations side by side. Other reports keep OHIF's own lines (null).
 */
function sciNodeSrLines(measurement, seriesInstanceUID) {
  const list = x => (Array.isArray(x) ? x : x ? [x] : []);
  const first = x => list(x)[0] || {};
  const code = item => first(item.ConceptNameCodeSequence).CodeValue;
  const sr = window.services.displaySetService.getDisplaySetsForSeries(seriesInstanceUID)
    .map(displaySet => displaySet.instance).find(instance => instance && instance.Manufacturer === 'sci-node');
  if (!sr) {
    return null;
  }
  const groups = list(list(sr.ContentSequence).find(item => code(item) === '126010')?.ContentSequence)
    .map(group => list(group.ContentSequence));
  const mine = groups.filter(items => items.some(item => item.UID === measurement.TrackingUniqueIdentifier));
  const count = groups.flat().find(item => code(item) === '246206008' && item.MeasuredValueSequence);
  const levels = [...new Set(mine.flat().filter(item => code(item) === '363698007')
    .map(item => first(item.ConceptCodeSequence).CodeMeaning).filter(site => site && site !== 'Spinal cord'))];
  // a NUM with a finding site of its own is a per-vertebral-level value (in the SR and report.json): the five
  // lines OHIF shows keep the finding's own summary
  const own = item => !list(item.ContentSequence).some(child => code(child) === '363698007');
  const rows = sciNodeSrRows(mine.flat().filter(item => item.ValueType === 'NUM' && item.MeasuredValueSequence
                                                && own(item)), first, code, list);
  if (!rows.length) {
    return null;
  }
  const lesion = /^Lesion \d+$/.test(measurement.TrackingIdentifier) && count;
  const total = lesion ? ` of ${Number(first(count.MeasuredValueSequence).NumericValue)}` : '';
  const title = { label: measurement.TrackingIdentifier + total,
                  value: levels.length ? levels.join(', ') : 'level not assessed' };
  return [title, ...rows];
}

/** One line per quantity (concept and unit) of the NUM items, their derivations on the same line. */
function sciNodeSrRows(nums, first, code, list) {
  const names = { 'Number of lesions': 'Lesions', Length: 'Length along cord', 'Certainty of Finding': 'Confidence',
                  Area: 'CSA' };
  const units = { '1': '', mm2: 'mm²', mm3: 'mm³' };
  const rows = new Map();
  for (const item of nums) {
    const measured = first(item.MeasuredValueSequence);
    const unit = first(measured.MeasurementUnitsCodeSequence).CodeValue;
    const meaning = first(item.ConceptNameCodeSequence).CodeMeaning;
    const derivation = list(item.ContentSequence).find(child => code(child) === '121401');
    const row = rows.get(meaning + '|' + unit) || { name: names[meaning] || meaning, unit: units[unit] ?? unit,
                                                    kinds: [], values: [] };
    if (derivation) {
      row.kinds.push(first(derivation.ConceptCodeSequence).CodeMeaning.toLowerCase());
    }
    row.values.push(String(Math.round(Number(measured.NumericValue) * 10) / 10));
    rows.set(meaning + '|' + unit, row);
  }
  return [...rows.values()].map(row => ({
    label: [row.name, row.kinds.join('/')].filter(Boolean).join(' '),
    value: row.values.join(' / ') + (row.unit ? ' ' + row.unit : ''),
  }));
}

window.config = {
  name: 'sci-node',
  routerBasename: '/ohif',
  extensions: [],
  modes: [],
  // segmentation editing (brush, eraser, add/delete segments, Export > DICOM SEG to the server) in the
  // basic viewer: OHIF's shipped customizations/segmentation/segmentationEditing.jsonc
  customizationUrlPrefixes: { default: './customizations/' },  // relative to PUBLIC_URL (/ohif/)
  customizationService: {
    requires: ['segmentation/segmentationEditing'],
    // the lines beside each finding of a sci-node report in OHIF's SR view (sciNodeSrLines above)
    global: {
      onBeforeSRAddMeasurement: {
        $set: ({ measurement, SeriesInstanceUID }) => {
          try {
            const lines = sciNodeSrLines(measurement, SeriesInstanceUID);
            if (lines) {
              measurement.labels = lines;  // in place: OHIF keeps this object, not the one returned
            }
          } catch (error) {
            console.warn('sci-node: SR labels', error);
          }
          return measurement;
        },
      },
    },
  },
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  // open our SEG/SR without the "Do you want to open this Segmentation?" prompt
  disableConfirmationPrompts: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'sci-node Orthanc',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
        // STOW-RS to Orthanc's /dicom-web/studies: OHIF stores edited segmentations back here
        supportsStow: true,
        dicomUploadEnabled: true,
      },
    },
  ],
};
EOF

rm -rf "$DEST.old"
[ -d "$DEST" ] && mv "$DEST" "$DEST.old"
mv "$NEW" "$DEST"
rm -rf "$DEST.old"
echo "$WANT" > "$STAMP"
echo "==> OHIF $OHIF_VERSION installed: orthanc/ohif-dist/ ($(du -sh "$DEST" | cut -f1)), served at /ohif/"

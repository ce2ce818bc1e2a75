# Sourced by tests/run-all.sh and the bench scripts: builds the node images (tests/k8s/build-images.sh;
# pause and base cached under $CACHE/images) with the plinth binary given as $1, and exports
# PLINTH_{PAUSE,BASE}_{IMAGE,ARCHIVE} and PLINTH_IMAGE{,_ARCHIVE}.
images=$(PLINTH_TEST_CACHE=$CACHE tests/k8s/build-images.sh "$1")
while IFS='=' read -r key value; do
  case $key in
    PLINTH_PAUSE_IMAGE|PLINTH_PAUSE_ARCHIVE|PLINTH_BASE_IMAGE|PLINTH_BASE_ARCHIVE|PLINTH_IMAGE|PLINTH_IMAGE_ARCHIVE)
      export "$key=$value"; echo "$key=$value" ;;
    *) echo "build-images.sh printed an unexpected line: $key=$value" >&2; exit 1 ;;
  esac
done <<<"$images"

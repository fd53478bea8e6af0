# Draws Apiary's icons (a honeycomb cell) without any image library: the app icons in src-tauri/icons
# and the tray state icons in assets/tray. Run from the repository root: python3 assets/make_icons.py .
import zlib, struct, math, sys, os
def png(w,h,pixels):
    raw=b''.join(b'\x00'+bytes(pixels[y*w*4:(y+1)*w*4]) for y in range(h))
    def chunk(t,d): return struct.pack('>I',len(d))+t+d+struct.pack('>I',zlib.crc32(t+d)&0xffffffff)
    return b'\x89PNG\r\n\x1a\n'+chunk(b'IHDR',struct.pack('>IIBBBBB',w,h,8,6,0,0,0))+chunk(b'IDAT',zlib.compress(raw,9))+chunk(b'IEND',b'')
def inside_hex(x,y,cx,cy,r):
    dx,dy=abs(x-cx),abs(y-cy)
    return dx<=r*math.sqrt(3)/2 and dy<=r-dx/math.sqrt(3)
def icon(size, fill, ring=None, bar=None):
    S=4; px=[0]*(size*size*4)
    cx=cy=size/2; r=size*0.46
    for y in range(size):
        for x in range(size):
            acc=[0,0,0,0]
            for sy in range(S):
                for sx in range(S):
                    fx=x+(sx+0.5)/S; fy=y+(sy+0.5)/S
                    c=None
                    if inside_hex(fx,fy,cx,cy,r):
                        c=fill
                        if inside_hex(fx,fy,cx,cy,r*0.42): c=(40,30,10,255)
                        if bar and abs(fx-cx)<size*0.06 and abs(fy-cy)<size*0.14: c=bar
                    if c:
                        for i in range(4): acc[i]+=c[i]
            n=S*S
            a=acc[3]/n
            if a>0:
                px[(y*size+x)*4:(y*size+x)*4+4]=[int(acc[0]/ (acc[3]/255) ) if acc[3] else 0, int(acc[1]/(acc[3]/255)) if acc[3] else 0, int(acc[2]/(acc[3]/255)) if acc[3] else 0, int(a)]
    return png(size,size,px)
AMBER=(245,166,35,255); GREY=(140,140,140,255); ORANGE=(214,110,20,255); RED=(210,50,40,255)
out=sys.argv[1]
for name,fill,bar in [('running',AMBER,None),('paused',GREY,(230,230,230,255)),('throttled',ORANGE,None),('error',RED,(255,255,255,255))]:
    open(os.path.join(out,'assets/tray',name+'.png'),'wb').write(icon(32,fill,bar=bar))
for s,n in [(32,'32x32.png'),(128,'128x128.png'),(256,'128x128@2x.png'),(512,'icon.png')]:
    open(os.path.join(out,'src-tauri/icons',n),'wb').write(icon(s,AMBER))
# ICO holding PNG images (Windows)
imgs=[icon(s,AMBER) for s in (16,32,48,256)]
hdr=struct.pack('<HHH',0,1,len(imgs)); off=6+16*len(imgs); ent=b''; data=b''
for s,d in zip((16,32,48,256),imgs):
    ent+=struct.pack('<BBBBHHII',s%256,s%256,0,0,1,32,len(d),off+len(data)); data+=d
open(os.path.join(out,'src-tauri/icons/icon.ico'),'wb').write(hdr+ent+data)
